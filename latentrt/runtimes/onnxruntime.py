"""The ONNX Runtime runtime: ONNX exports (:mod:`latentrt.exporters.onnx`) run by ``onnxruntime``.

Execution providers are chosen by availability (https://onnxruntime.ai/docs/execution-providers/):
on a CUDA device, TensorRT (when ``onnxruntime-gpu`` has it and the ``tensorrt`` package is
installed) then CUDA, with CPU as the fallback for nodes they do not take; on the CPU, the CPU
provider. Sessions use ``threads`` intra-op threads (default: torch's thread count) and
``optimization`` as the online graph optimization level on top of the offline-optimized file,
which is used when it was optimized for the same providers. On CUDA, inputs and outputs stay on
the GPU through I/O binding (https://onnxruntime.ai/docs/api/python/api_summary.html#iobinding).

A feed outside the exported shape range is refused before the session runs, with the range in
the message (``ExportSpec.check_feeds``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentrt.core.errors import RuntimeUnavailable
from latentrt.core.protocols import Artifact, CompileRequest, ExportSpec
from latentrt.exporters.cache import cached_artifact
from latentrt.exporters.onnx import OnnxExporter, require_onnx
from latentrt.exporters.ort import ort_session
from latentrt.exporters.tensorrt_build import tensorrt_installed

__all__ = ["OnnxRuntime", "OrtModule"]

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_TORCH_DTYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
Provider = str | tuple[str, dict[str, Any]]


class OrtModule:
    """An ONNX Runtime session behind the ``CompiledModule`` interface (thread-safe: ``run`` is)."""

    def __init__(
        self, session: Any, spec: ExportSpec, artifact: Artifact, device: torch.device, bind: bool, file: str
    ) -> None:
        self.session = session
        self.model_file = artifact.directory / file
        self.spec = spec
        self.artifact = artifact
        self.device = device
        self.input_dtypes = {i.name: _TORCH_DTYPES.get(i.type, torch.float32) for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        self.output_dtypes = {o.name: _TORCH_DTYPES.get(o.type, torch.float32) for o in session.get_outputs()}
        self.bind = bind
        self._output_shapes: dict[tuple[tuple[int, ...], ...], list[tuple[int, ...]]] = {}

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on, in priority order."""
        return list(self.session.get_providers())

    def __call__(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check the feeds against the exported range, run once, return tensors on ``device``."""
        self.spec.check_feeds(feeds)
        if self.bind:
            return self._run_bound(feeds)
        arrays = {
            name: feeds[name].detach().to("cpu", self.input_dtypes[name]).contiguous().numpy()
            for name in self.spec.input_names
        }
        outputs = self.session.run(self.output_names, arrays)
        return {
            name: torch.from_numpy(array).to(self.device)
            for name, array in zip(self.output_names, outputs, strict=True)
        }

    def _run_bound(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run with inputs and outputs bound to CUDA memory (outputs preallocated once their shapes are known)."""
        binding, index = self.session.io_binding(), self.device.index or 0
        inputs = {
            name: feeds[name].detach().to(self.device, self.input_dtypes[name]).contiguous()
            for name in self.spec.input_names
        }
        for name, tensor in inputs.items():
            binding.bind_input(name, "cuda", index, _NUMPY_DTYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        signature = tuple(tuple(t.shape) for t in inputs.values())
        shapes = self._output_shapes.get(signature)
        outputs: dict[str, Tensor] = {}
        for position, name in enumerate(self.output_names):
            if shapes is None:
                binding.bind_output(name, "cuda", index)
                continue
            out = torch.empty(shapes[position], dtype=self.output_dtypes[name], device=self.device)
            binding.bind_output(name, "cuda", index, _NUMPY_DTYPES[out.dtype], tuple(out.shape), out.data_ptr())
            outputs[name] = out
        torch.cuda.synchronize(self.device)  # inputs written by torch's stream must be complete
        self.session.run_with_iobinding(binding)
        if shapes is not None:
            return outputs
        arrays = binding.copy_outputs_to_cpu()  # first call at this shape: learn the output shapes
        self._output_shapes[signature] = [tuple(a.shape) for a in arrays]
        return {name: torch.from_numpy(a).to(self.device) for name, a in zip(self.output_names, arrays, strict=True)}


@dataclass
class OnnxRuntime:
    """Implements the core ``ArtifactRuntime`` protocol with ONNX Runtime (see the module docstring).

    ``providers`` overrides the automatic choice (names such as ``"CPUExecutionProvider"``);
    ``optimization`` is the session's online level (``disabled``, ``basic``, ``extended``, ``all``).
    """

    name: str = "onnxruntime"
    exporter: str = "onnx"
    providers: tuple[str, ...] | None = None
    threads: int | None = None
    optimization: str = "all"
    io_binding: bool = True

    def available(self) -> bool:
        """Whether ``onnxruntime`` can be imported."""
        return importlib.util.find_spec("onnxruntime") is not None

    def version(self) -> str:
        """The onnxruntime version."""
        self._require()
        import onnxruntime

        return str(onnxruntime.__version__)

    def execution_providers(self, device: torch.device) -> list[Provider]:
        """The providers (with their options) for ``device``, best first; CPU always last."""
        self._require()
        import onnxruntime

        available = set(onnxruntime.get_available_providers())
        if self.providers is not None:
            missing = [p for p in self.providers if p not in available]
            if missing:
                raise RuntimeUnavailable(
                    f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(sorted(available))})"
                )
            return list(self.providers)
        if device.type == "cpu":
            return [CPU]
        if device.type != "cuda" or CUDA not in available:
            raise RuntimeUnavailable(
                f"onnxruntime here cannot run on {device} (providers: {', '.join(sorted(available))}); "
                "install onnxruntime-gpu instead of onnxruntime for CUDA, or use --device cpu"
            )
        index = device.index or 0
        chosen: list[Provider] = []
        if TENSORRT in available and tensorrt_installed():  # the real library, not only its type stubs
            chosen.append((TENSORRT, {"device_id": index, "trt_engine_cache_enable": True}))
        return [*chosen, (CUDA, {"device_id": index}), CPU]

    def device_tag(self, device: torch.device, providers: Sequence[Provider]) -> str:
        """What a compiled artifact is tied to: providers, and the GPU model and compute capability."""
        names = "+".join(_provider_name(p) for p in providers)
        if device.type != "cuda":
            return f"{device.type}:{names}"
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{names}:{torch.cuda.get_device_name(device)}:sm{major}{minor}"

    def compile(self, request: CompileRequest) -> OrtModule:
        """Export on first use (engine cache, :mod:`latentrt.exporters.cache`), then load."""
        require_onnx()
        providers = self.execution_providers(request.device)
        offline = tuple(name for p in providers if (name := _provider_name(p)) != TENSORRT)
        exporter = OnnxExporter(providers=offline, threads=self.threads, progress=request.progress)
        artifact = cached_artifact(exporter, self, request, self.device_tag(request.device, providers))
        return self.load(artifact, request.device)

    def load(self, artifact: Artifact, device: str | torch.device) -> OrtModule:
        """A session for ``artifact`` on ``device``: the offline-optimized file when it suits the providers."""
        device = torch.device(device)
        providers = self.execution_providers(device)
        names = [_provider_name(p) for p in providers]
        manifest = artifact.manifest
        optimized_for = manifest.get("optimization", {}).get("providers")
        file = manifest.get("runtime_model") if optimized_for == names else manifest.get("model")
        if not isinstance(file, str) or not (artifact.directory / file).is_file():
            raise RuntimeUnavailable(
                f"{artifact.directory}: the manifest names no model file that exists; export again"
            )
        if TENSORRT in names:  # TensorRT engines are built on first run, cached beside the model
            providers = [(TENSORRT, {**p[1], "trt_engine_cache_path": str(artifact.directory / "tensorrt")})
                         if isinstance(p, tuple) and p[0] == TENSORRT else p for p in providers]  # fmt: skip
        threads = self.threads or torch.get_num_threads()
        session = ort_session(artifact.directory / file, providers, level=self.optimization, threads=threads)
        bind = self.io_binding and device.type == "cuda"
        return OrtModule(session, artifact.spec, artifact, device, bind, file)

    def _require(self) -> None:
        if not self.available():
            raise RuntimeUnavailable("the onnxruntime runtime needs onnxruntime: pip install 'latentrt[onnx]'")


def _provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]
