"""The ONNX exporter: a backbone -> ``model.onnx``, its ONNX Runtime-optimized copy, and a checked manifest.

Steps (each timed in the manifest):

1. **export**: ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based exporter) at opset
   :data:`OPSET`, traced at the spec's optimal sizes, every ``dynamic_axes`` entry dynamic. Axes of
   tensors with a ``pixel_scale`` are named ``<symbol>_div<scale>`` in the graph (``height_div8``
   for SD latents) so a symbolic name never stands for two different sizes. Models over the 2 GB
   protobuf limit keep their weights in one external file beside the model, ``model.onnx.data``
   (https://onnx.ai/onnx/repo-docs/ExternalData.html).
2. **fp16** (``precision="fp16"``): weights and compute converted with ONNX Runtime's float16
   converter, inputs and outputs kept float32 (``keep_io_types``), so callers feed float32 either way.
3. **optimize**: ONNX Runtime's graph optimizer run offline at :data:`OFFLINE_LEVEL` for the
   execution providers the model will run on, saved as ``model.optimized.onnx``
   (https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html). Fused
   nodes are provider-specific, hence the providers in the manifest and the cache key.
4. **validate**: the file a runtime will load runs against the float32 torch module on the spec's
   sample inputs at two shapes (smallest; optimal batch and height at the smallest width). An
   output passes when ``max |onnx - torch| <= tolerance * max(1, max |torch|)``. A component listed in
   ``keep_fp32`` whose fp16 outputs overflow (the SDXL VAE is the known case) is exported again in
   fp32, and the manifest says so; overflow shows as NaN/inf, or, where a provider computes in fp32
   with weights clamped to fp16's range, as a difference over the tolerance, so any fp16 failure
   of such a component falls back. A failed check is written to the manifest
   (``"status": "failed"``) and raised as an :class:`~latentrt.core.errors.ExportError`.

Everything is written to a temporary folder beside ``out_dir`` and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from latentrt._version import __version__
from latentrt.core.checkpoint import file_sha256
from latentrt.core.errors import ExportError, RuntimeUnavailable
from latentrt.core.protocols import Artifact, ExportSpec
from latentrt.exporters import MANIFEST, MANIFEST_FORMAT, spec_to_json
from latentrt.exporters.ort import device_of, external_bytes, failure_summary, ort_session, validate

__all__ = [
    "MODEL",
    "OFFLINE_LEVEL",
    "OPSET",
    "OPTIMIZED",
    "TOLERANCE",
    "ExportStages",
    "OnnxExporter",
    "float32_eval",
    "move_into_place",
    "onnx_dim_names",
    "require_onnx",
]

logger = logging.getLogger(__name__)

OPSET = 18
"""ai.onnx opset of exported graphs (the ``torch.export``-based exporter needs 18 or newer)."""
MODEL, OPTIMIZED = "model.onnx", "model.optimized.onnx"
OFFLINE_LEVEL = "extended"
"""Offline optimization level: basic and extended fusions; layout changes are left to the session."""
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
"""Allowed max abs difference to torch, relative to ``max(1, max |torch output|)``."""
PROTOBUF_LIMIT = 2**31 - 1  # bytes a single ONNX protobuf can hold
_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def require_onnx() -> None:
    """Raise RuntimeUnavailable unless onnx, onnxruntime and onnxscript can be imported."""
    for name in _PACKAGES:
        try:
            __import__(name)
        except ImportError as exc:
            raise RuntimeUnavailable(
                f"ONNX export needs the {name} package ({exc}); install it with pip install 'latentrt[onnx]'"
            ) from exc


def onnx_dim_names(spec: ExportSpec) -> dict[str, dict[int, str]]:
    """Graph names of the dynamic axes: the spec's symbols, ``<symbol>_div<scale>`` on scaled tensors."""
    names: dict[str, dict[int, str]] = {}
    for tensor, axes in spec.dynamic_axes.items():
        scale = spec.pixel_scale.get(tensor, 1)
        names[tensor] = {
            axis: symbol if symbol == "batch" or scale == 1 else f"{symbol}_div{scale}" for axis, symbol in axes.items()
        }
    return names


def _trace_dims(spec: ExportSpec) -> dict[str, int]:
    """Sizes the graph is traced at: optimal, with a batch of 2 (``torch.export`` specializes size-1 axes)."""
    dims = {name: opt for name, (_, opt, _) in spec.shape_range.items()}
    if "batch" in dims:
        dims["batch"] = max(2, dims["batch"])
    return dims


def float32_eval(module: nn.Module) -> nn.Module:
    """``module`` in eval mode, as a float32 copy when any parameter is in another dtype."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters()):
        module = copy.deepcopy(module).float()
    return module.eval()


def _tool_versions() -> dict[str, str]:
    versions = {"latentrt": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in (*_PACKAGES, "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def _graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and (symbolic) shapes of the graph's inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": dims}

    return {"inputs": [describe(v) for v in graph.input], "outputs": [describe(v) for v in graph.output]}


@dataclass
class ExportStages:
    """Wall-clock seconds per export stage, with a progress bar over them."""

    bar: tqdm[Any]
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
        self.bar.update(1)


@dataclass
class OnnxExporter:
    """Exports backbones to ONNX (see the module docstring); implements the core ``Exporter`` protocol.

    ``providers`` are the ONNX Runtime execution providers the offline optimization targets;
    ``keep_fp32`` the components exported in fp32 when their fp16 outputs overflow;
    ``validation_level`` the session optimization level validation runs at (the runtime's default).
    """

    name: str = "onnx"
    opset: int = OPSET
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    optimization: str = OFFLINE_LEVEL
    tolerance: Mapping[str, float] = field(default_factory=lambda: dict(TOLERANCE))
    keep_fp32: tuple[str, ...] = ("vae_decoder", "vae_encoder")
    validation_level: str = "all"
    threads: int | None = None
    progress: bool = True

    def version(self) -> str:
        """Exporter, tool versions, opset and offline optimization (part of the engine-cache key)."""
        tools = ", ".join(f"{k} {v}" for k, v in sorted(_tool_versions().items()) if k not in ("python", "numpy"))
        optimized = f"{self.optimization} for {'+'.join(self.providers)}"
        return f"onnx exporter {MANIFEST_FORMAT} ({tools}; opset {self.opset}; optimized {optimized})"

    def export(
        self,
        backbone: nn.Module,
        spec: ExportSpec,
        out_dir: Path,
        precision: str,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Export ``backbone`` into ``out_dir`` (replacing it), validate it, write ``manifest.json``."""
        require_onnx()
        if precision not in TOLERANCE:
            raise ExportError(
                f"ONNX export precision must be fp32 or fp16 (load the model in one of them), got {precision!r}"
            )
        if spec.sample_inputs is None:
            raise ExportError(f"{spec.name}: its export spec has no sample inputs to trace and validate with")
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            manifest = self._build(float32_eval(backbone), spec, work, precision, dict(metadata or {}))
            move_into_place(work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        artifact = Artifact(out_dir, tuple(manifest["files"]), spec, manifest)
        if manifest["status"] != "ok":
            raise ExportError(f"{spec.name}: {manifest['failure']} (details in {out_dir / MANIFEST})")
        return artifact

    def _build(
        self, module: nn.Module, spec: ExportSpec, work: Path, precision: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """Run the stages in ``work`` and return the manifest (already written there)."""
        start = time.perf_counter()
        total = 2 + (precision == "fp16") + (self.optimization != "disabled")  # export, [fp16], [optimize], validate
        with tqdm(total=total, desc=f"export {spec.name}", unit="stage", disable=not self.progress, leave=False) as bar:
            stages = ExportStages(bar)
            fp32_dir = work / "fp32" if precision == "fp16" else work
            fp32_dir.mkdir(exist_ok=True)
            with stages.stage("export"):
                self._export_graph(module, spec, fp32_dir / MODEL)
            used, note = precision, None
            if precision == "fp16":
                with stages.stage("fp16"):
                    _convert_fp16(fp32_dir / MODEL, work / MODEL)
            runtime_file = self._optimize(work, stages)
            with stages.stage("validate"):
                validation = self._validate(module, spec, work / runtime_file, used)
            if precision == "fp16" and spec.name in self.keep_fp32 and not validation["passed"]:
                used, note = "fp32", f"kept fp32: in fp16 {failure_summary(validation)}"
                logger.warning("%s: %s", spec.name, note)
                _replace_with_fp32(work, fp32_dir)
                runtime_file = self._optimize(work, stages)
                with stages.stage("validate"):
                    validation = self._validate(module, spec, work / runtime_file, used)
            if fp32_dir != work:
                shutil.rmtree(fp32_dir)
            stages.seconds["total"] = round(time.perf_counter() - start, 3)
        manifest = self._manifest(spec, work, runtime_file, (precision, used, note), validation, stages.seconds)
        manifest["metadata"] = metadata
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return manifest

    def _export_graph(self, module: nn.Module, spec: ExportSpec, path: Path) -> None:
        """``torch.onnx.export`` (dynamo) with named, dynamic axes; external data past 2 GB."""
        assert spec.sample_inputs is not None
        feeds = spec.sample_inputs(_trace_dims(spec))
        names = onnx_dim_names(spec)
        args = tuple(feeds[name].to(device_of(module)) for name in spec.input_names)
        try:
            with _quiet_exporter():
                program = torch.onnx.export(
                    _Positional(module).eval(),
                    args,
                    input_names=list(spec.input_names),
                    output_names=list(spec.output_names),
                    dynamic_shapes=_dynamic_shapes(spec, names),
                    opset_version=self.opset,
                    dynamo=True,
                    optimize=True,
                    verbose=False,
                )
        except Exception as exc:
            raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
        assert program is not None
        _name_output_dims(program.model, names)
        program.save(str(path))

    def _optimize(self, work: Path, stages: ExportStages) -> str:
        """Write ``model.optimized.onnx`` with ONNX Runtime's offline optimizer; the file a runtime loads."""
        if self.optimization == "disabled":
            return MODEL
        with stages.stage("optimize"):
            ort_session(
                work / MODEL, self.providers, level=self.optimization, threads=self._threads(), save_to=work / OPTIMIZED
            )
        return OPTIMIZED

    def _threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def _validate(self, module: nn.Module, spec: ExportSpec, path: Path, precision: str) -> dict[str, Any]:
        """Compare the exported file with torch (:func:`~latentrt.exporters.ort.validate`)."""
        session = ort_session(path, self.providers, level=self.validation_level, threads=self._threads())
        return validate(module, spec, session, self.tolerance[precision], path.name)

    def _manifest(
        self,
        spec: ExportSpec,
        work: Path,
        runtime_file: str,
        precisions: tuple[str, str, str | None],
        validation: dict[str, Any],
        seconds: dict[str, float],
    ) -> dict[str, Any]:
        requested, used, note = precisions
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(work.iterdir()) if p.is_file()
        }
        failure = None if validation["passed"] else failure_summary(validation)
        return {
            "format": MANIFEST_FORMAT,
            "status": "ok" if failure is None else "failed",
            "failure": failure,
            "component": spec.name,
            "exporter": self.name,
            "exporter_version": self.version(),
            **_graph_io(work / MODEL),
            "shape_range": {k: list(v) for k, v in spec.shape_range.items()},
            "spec": spec_to_json(spec),
            "precision": used,
            "requested_precision": requested,
            "precision_note": note,
            "opset": self.opset,
            "model": MODEL,
            "runtime_model": runtime_file,
            "optimization": {"level": self.optimization, "providers": list(self.providers)},
            "external_data": any(name.endswith(".data") for name in files),
            "files": files,
            "tool_versions": _tool_versions(),
            "validation": validation,
            "seconds": seconds,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep ``torch.onnx``'s progress logging and deprecation chatter out of the user's terminal."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnx_ir", "onnxscript")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)  # shared dims
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


class _Positional(nn.Module):
    """``module`` behind ``forward(*inputs)``, so dynamic shapes are given the same way for every backbone."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: Tensor) -> Any:
        """``module(*inputs)``."""
        return self.module(*inputs)


def _dynamic_shapes(spec: ExportSpec, names: Mapping[str, Mapping[int, str]]) -> tuple[tuple[dict[int, Any], ...]]:
    """``torch.export`` dynamic shapes for a ``forward(*inputs)``: one named ``Dim`` per graph axis
    name, shared by every input that uses it (so equal names are constrained equal)."""
    dims: dict[str, Any] = {}
    per_input = tuple(
        {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in names.get(tensor, {}).items()}
        for tensor in spec.input_names
    )
    return (per_input,)  # a single entry: the ``*inputs`` parameter


def _name_output_dims(model: Any, names: Mapping[str, Mapping[int, str]]) -> None:
    """Give the graph's outputs the spec's symbolic axis names (``torch.export`` derives its own)."""
    import onnx_ir as ir

    for value in model.graph.outputs:
        axes = names.get(value.name)
        if not axes or value.shape is None:
            continue
        dims: list[int | str | None] = [
            axes.get(i, d if isinstance(d, int) else None) for i, d in enumerate(value.shape)
        ]
        value.shape = ir.Shape(dims)


def _convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and compute, float32 inputs and outputs (ONNX Runtime's float16 converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    large = external_bytes(source) > 0 or converted.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(
        converted,
        str(target),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=target.name + ".data",
        size_threshold=1024,
    )


def _replace_with_fp32(work: Path, fp32_dir: Path) -> None:
    """Drop the fp16 files in ``work`` and move the fp32 export up in their place."""
    for path in work.iterdir():
        if path.is_file():
            path.unlink()
    for path in fp32_dir.iterdir():
        path.rename(work / path.name)


def move_into_place(work: Path, out_dir: Path) -> None:
    """Rename the finished ``work`` folder to ``out_dir``, replacing what was there."""
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        out_dir.rename(trash / out_dir.name)
        shutil.rmtree(trash, ignore_errors=True)
    work.rename(out_dir)
