"""The TensorRT runtime: engines from :mod:`latentrt.exporters.tensorrt`, run on torch's CUDA tensors.

The engine lifecycle of the TensorRT demo (build, load, activate, allocate, infer), typed:

* **compile**: build on first use into the engine cache; the key's device holds the GPU, its compute
  capability and the TensorRT version, so an engine from another GPU or TensorRT is rebuilt, not loaded.
* **load**: the manifest's TensorRT version and compute capability are checked against this machine,
  then the plan is deserialized once (``trt.Runtime.deserialize_cuda_engine``).
* **activate**: one ``IExecutionContext`` per CUDA stream, created on the stream's first call. An
  engine holds ``streams`` copies of its profiles, because a profile serves one context at a time;
  streams beyond that share contexts in turn, each waiting for the last one's work on it.
* **infer**: the feeds are checked against the spec's range and the engine's profiles before anything
  runs; ``set_input_shape`` and ``set_tensor_address`` take the torch tensors' device pointers (no host
  copies), outputs are torch tensors sized by ``get_tensor_shape``, and ``execute_async_v3`` runs on
  torch's current stream, so later torch work is ordered after it without a synchronization
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html).
* **CUDA graphs** (``cuda_graphs=True``): per profile and input shapes, captured after a plain run
  (developer guide, "CUDA Graphs"); a replay copies the inputs into the graph's buffers.
* **refit**: :meth:`TensorRTModule.refit` (``trt.Refitter``), for engines built refittable.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from latentrt.core.errors import ExportError, InvalidRequest, RuntimeUnavailable
from latentrt.core.protocols import Artifact, CompileRequest, ExportSpec
from latentrt.exporters.cache import cached_artifact
from latentrt.exporters.tensorrt import TensorRTExporter
from latentrt.exporters.tensorrt_build import INSTALL, tensorrt_version, torch_dtype, trt_logger
from latentrt.exporters.tensorrt_plan import (
    ENGINE,
    REFIT_MAP,
    UNBOUNDED,
    EngineLayout,
    device_tag,
    engine_mismatch,
    select_profile,
)
from latentrt.exporters.tensorrt_refit import RefitMap
from latentrt.runtimes.tensorrt_refit import RefitReport, refit_engine

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["TensorRTModule", "TensorRTRuntime", "deserialize_engine", "missing_requirements"]

Signature = tuple[int, tuple[tuple[int, ...], ...]]  # profile, input shapes


def missing_requirements() -> list[str]:
    """What TensorRT needs that this machine lacks: ``"TensorRT"`` (the package), ``"a CUDA GPU"``."""
    from latentrt.exporters.tensorrt_build import require_tensorrt  # looked up per call (tests patch it)

    missing = []
    try:
        require_tensorrt()
    except RuntimeUnavailable:
        missing.append("TensorRT")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    return missing


def deserialize_engine(plan: bytes, device: torch.device) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """The engine in ``plan`` on ``device``, and the ``trt.Runtime`` that must outlive it."""
    import tensorrt as trt

    with torch.cuda.device(device):
        runtime = trt.Runtime(trt_logger())
        engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ExportError(
            "TensorRT could not deserialize the engine (built by another TensorRT or GPU, or damaged); build it again"
        )
    return runtime, engine


@dataclass
class _Graph:
    """A captured CUDA graph and the static buffers its kernels read and write."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


@dataclass
class _Slot:
    """One execution context: its index among the engine's profile copies, and what it is bound to."""

    index: int
    context: trt.IExecutionContext
    lock: threading.Lock = field(default_factory=threading.Lock)
    profile: int = -1
    stream: torch.cuda.Stream | None = None
    bound: Signature | None = None
    graphs: dict[Signature, _Graph] = field(default_factory=dict)


class TensorRTModule:
    """A deserialized engine behind the ``CompiledModule`` interface (see the module docstring).

    Thread-safe: each execution context is used under its own lock.
    """

    def __init__(
        self,
        engine: trt.ICudaEngine,
        runtime: trt.Runtime | None,
        layout: EngineLayout,
        device: torch.device,
        *,
        artifact: Artifact | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        self.engine, self.runtime, self.layout, self.device = engine, runtime, layout, device
        self.spec: ExportSpec = layout.spec
        self.artifact = artifact
        self.cuda_graphs = cuda_graphs
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._by_stream: dict[int, _Slot] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def __call__(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check the feeds against the built range and profiles, then run once on torch's current stream."""
        self.spec.check_feeds(feeds)
        shapes = {name: tuple(feeds[name].shape) for name in self.layout.inputs}
        profile = select_profile(self.layout.profiles, self.spec, shapes)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            inputs = {n: feeds[n].detach().to(self.device, self._dtype(n)).contiguous() for n in self.layout.inputs}
            slot = self._slot(stream)
            with self._using(slot, stream):
                if self.cuda_graphs:
                    return self._run_graph(slot, profile, inputs, stream)
                outputs = self._bind(slot, profile, inputs, None, stream)
                self._execute(slot, stream)
                return outputs

    def refit(self, state_dict: Mapping[str, Tensor]) -> RefitReport:
        """Replace the engine's weights with ``state_dict``'s (the component's state-dict keys) without a
        rebuild; refused when the engine was not built refittable."""
        if not self.engine.refittable:
            raise InvalidRequest(
                f"{self.spec.name}: this TensorRT engine was not built refittable, so its weights cannot be "
                "replaced; build it with TensorRTRuntime(refittable=True) (a separate cache entry)"
            )
        if self.artifact is None or not (self.artifact.directory / REFIT_MAP).is_file():
            raise InvalidRequest(f"{self.spec.name}: the engine has no {REFIT_MAP} beside it; build it again")
        mapping = RefitMap.read(self.artifact.directory / REFIT_MAP)
        with self._lock, contextlib.ExitStack() as held:
            for slot in self._slots:  # no context may run while the weights change
                held.enter_context(slot.lock)
            torch.cuda.synchronize(self.device)
            report = refit_engine(self.engine, mapping, state_dict, self.device)
            for slot in self._slots:
                slot.graphs.clear()
                slot.bound = None
        return report

    def _dtype(self, name: str) -> torch.dtype:
        if name not in self._dtypes:
            self._dtypes[name] = torch_dtype(self.engine.get_tensor_dtype(name))
        return self._dtypes[name]

    def _slot(self, stream: torch.cuda.Stream) -> _Slot:
        """The context of ``stream``: a new one while the engine has free profile copies, else one in turn."""
        with self._lock:
            slot = self._by_stream.get(stream.cuda_stream)
            if slot is None:
                if len(self._slots) < self.layout.streams:
                    slot = _Slot(len(self._slots), self.engine.create_execution_context())
                    self._slots.append(slot)
                else:
                    slot = self._slots[len(self._by_stream) % len(self._slots)]
                self._by_stream[stream.cuda_stream] = slot
            return slot

    @contextlib.contextmanager
    def _using(self, slot: _Slot, stream: torch.cuda.Stream) -> Iterator[None]:
        """Hold ``slot``; a stream taking it over waits for the work the previous one queued on it."""
        with slot.lock:
            if slot.stream is not None and slot.stream.cuda_stream != stream.cuda_stream:
                stream.wait_stream(slot.stream)
            slot.stream = stream
            yield

    def _bind(
        self,
        slot: _Slot,
        profile: int,
        inputs: Mapping[str, Tensor],
        outputs: dict[str, Tensor] | None,
        stream: torch.cuda.Stream,
    ) -> dict[str, Tensor]:
        """Select the profile, set input shapes and addresses, bind output buffers (allocated when not given)."""
        context = slot.context
        index = self.layout.profile_index(slot.index, profile)
        if slot.profile != index:
            if not context.set_optimization_profile_async(index, stream.cuda_stream):
                raise RuntimeUnavailable(f"{self.spec.name}: TensorRT could not select optimization profile {index}")
            slot.profile = index
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise InvalidRequest(f"{self.spec.name}: TensorRT refused input {name} of shape {list(tensor.shape)}")
            context.set_tensor_address(name, tensor.data_ptr())
        if outputs is None:
            outputs = {}
            for name in self.layout.outputs:
                dims = context.get_tensor_shape(name)
                shape = [dims[i] for i in range(len(dims))]
                outputs[name] = torch.empty(shape, dtype=self._dtype(name), device=self.device)
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        slot.bound = (profile, tuple(tuple(t.shape) for t in inputs.values()))
        return outputs

    def _execute(self, slot: _Slot, stream: torch.cuda.Stream) -> None:
        if not slot.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeUnavailable(f"{self.spec.name}: TensorRT failed to run the engine (its log above says why)")

    def _run_graph(
        self, slot: _Slot, profile: int, inputs: dict[str, Tensor], stream: torch.cuda.Stream
    ) -> dict[str, Tensor]:
        """Replay the graph captured for these shapes (capturing it after a plain run the first time)."""
        key: Signature = (profile, tuple(tuple(t.shape) for t in inputs.values()))
        graph = slot.graphs.get(key)
        if graph is None:
            static = {name: tensor.clone() for name, tensor in inputs.items()}
            outputs = self._bind(slot, profile, static, None, stream)
            self._execute(slot, stream)  # the plain run: TensorRT finishes its lazy setup outside the capture
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                self._execute(slot, torch.cuda.current_stream(self.device))
            slot.graphs[key] = _Graph(cuda_graph, static, outputs)
            return {name: tensor.clone() for name, tensor in outputs.items()}
        for name, tensor in inputs.items():
            graph.inputs[name].copy_(tensor)
        if slot.bound != key:  # other shapes ran since: a plain run re-binds the context to this graph's state
            self._bind(slot, profile, graph.inputs, graph.outputs, stream)
            self._execute(slot, stream)
        else:
            graph.graph.replay()
        return {name: tensor.clone() for name, tensor in graph.outputs.items()}


@dataclass
class TensorRTRuntime:
    """Implements the core ``ArtifactRuntime`` protocol with TensorRT (see the module docstring).

    Build settings (``refittable``, ``static``, ``profiles``, ``unbounded``, ``strongly_typed``,
    ``workspace``, ``streams``) are passed to :class:`~latentrt.exporters.tensorrt.TensorRTExporter` and
    are part of the cache key; ``cuda_graphs`` captures a CUDA graph per input shape at run time.
    """

    name: str = "tensorrt"
    exporter: str = "tensorrt"
    refittable: bool = False
    static: bool = False
    profiles: tuple[Mapping[str, tuple[int, int, int]], ...] = ()
    unbounded: Mapping[str, tuple[int, int, int]] = field(default_factory=lambda: dict(UNBOUNDED))
    strongly_typed: bool = False
    workspace: int | None = None
    streams: int = 1
    cuda_graphs: bool = False

    def available(self) -> bool:
        """Whether TensorRT imports and a CUDA GPU is present."""
        return not missing_requirements()

    def require(self, device: torch.device) -> None:
        """Raise RuntimeUnavailable, in one line naming what is missing, unless TensorRT can run on ``device``."""
        missing = missing_requirements()
        if missing:
            what = " and ".join(missing)
            raise RuntimeUnavailable(
                f"the tensorrt runtime needs {what}, which this machine lacks: on a machine with an NVIDIA GPU "
                f"and a CUDA build of torch, {INSTALL}"
            )
        if device.type != "cuda":
            raise RuntimeUnavailable(f"TensorRT runs on CUDA GPUs, not on {device}: pass --device cuda")

    def version(self) -> str:
        """The TensorRT version."""
        return tensorrt_version()

    def device_tag(self, device: torch.device) -> str:
        """What an engine is tied to: the GPU, its compute capability and the TensorRT version."""
        capability = torch.cuda.get_device_capability(device)
        return device_tag(torch.cuda.get_device_name(device), capability, self.version())

    def exporter_for(self, device: torch.device, progress: bool = True) -> TensorRTExporter:
        """The exporter that builds this runtime's engines on ``device``."""
        return TensorRTExporter(
            device=str(device),
            profiles=self.profiles,
            static=self.static,
            unbounded=self.unbounded,
            strongly_typed=self.strongly_typed,
            refittable=self.refittable,
            workspace=self.workspace,
            streams=self.streams,
            progress=progress,
        )

    def compile(self, request: CompileRequest) -> TensorRTModule:
        """Build on first use (engine cache, :mod:`latentrt.exporters.cache`), then load."""
        self.require(request.device)
        exporter = self.exporter_for(request.device, request.progress)
        artifact = cached_artifact(exporter, self, request, self.device_tag(request.device))
        return self.load(artifact, request.device)

    def load(self, artifact: Artifact, device: str | torch.device) -> TensorRTModule:
        """Deserialize ``artifact``'s engine onto ``device``; refused when it was built for another TensorRT or GPU."""
        device = torch.device(device)
        self.require(device)
        if artifact.manifest.get("exporter") != self.exporter:
            raise ExportError(f"{artifact.directory}: not a TensorRT engine folder; build it with --to tensorrt")
        problem = engine_mismatch(artifact.manifest, self.version(), torch.cuda.get_device_capability(device))
        if problem is not None:
            raise ExportError(
                f"{artifact.directory}: {problem}; rebuild it here (latentrt export --to tensorrt --device cuda)"
            )
        runtime, engine = deserialize_engine((artifact.directory / ENGINE).read_bytes(), device)
        layout = EngineLayout.from_manifest(artifact.manifest, artifact.spec)
        return TensorRTModule(engine, runtime, layout, device, artifact=artifact, cuda_graphs=self.cuda_graphs)
