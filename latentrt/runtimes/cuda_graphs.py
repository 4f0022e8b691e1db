"""The ``torch_cuda_graphs`` runtime: a component's torch module replayed from CUDA graphs.

A UNet step at a fixed shape launches hundreds of small kernels; a CUDA graph records them once and
replays them with one launch (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs). The
lifecycle per input signature (names, shapes, dtypes, device of the feeds):

1. warm up: run the module eagerly a few times on a side stream (lazy initialisation, cuDNN and
   cuBLAS workspaces), as the ``torch.cuda.graphs`` notes require;
2. capture: allocate static input buffers, record one forward into a ``CUDAGraph`` (private memory
   pool per graph);
3. replay: copy the new feeds into the static inputs, replay, and return clones of the static
   outputs, so a result never changes under the caller when the next replay overwrites the buffers.

A new signature (image size, batch) is captured anew; at most ``max_graphs`` are kept (least recently
used dropped first, each holds its own activation memory). Off CUDA, or when a capture fails (an op
that syncs with the host or allocates CPU tensors mid-forward), the module runs eagerly and the reason
is logged once. The graph machinery is injectable (:class:`GraphBackend`) so the capture logic is
tested on the CPU with a fake.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from latentrt.core.protocols import CompileRequest, ExportSpec
from latentrt.runtimes.memory_format import to_channels_last
from latentrt.runtimes.torch import TorchModule

__all__ = [
    "CapturedGraph",
    "CudaGraphBackend",
    "CudaGraphRuntime",
    "Graph",
    "GraphBackend",
    "GraphedModule",
    "Signature",
    "cuda_graphs_channels_last_runtime",
    "feed_signature",
]

logger = logging.getLogger(__name__)

Outputs = tuple[Tensor, ...]
Signature = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]
"""``(name, shape, dtype, device)`` of each feed: one graph is captured per signature."""


class Graph(Protocol):
    """A recorded sequence of kernels: ``replay()`` reruns it on the buffers it was captured with."""

    def replay(self) -> None:
        """Run the recorded kernels once more."""
        ...


class GraphBackend(Protocol):
    """Warms up and captures a forward; ``torch.cuda`` on a GPU, a fake in tests."""

    def warm_up(self, run: Callable[[], Outputs], runs: int) -> None:
        """Run ``run`` eagerly ``runs`` times before capture (on a side stream on CUDA)."""
        ...

    def capture(self, run: Callable[[], Outputs]) -> tuple[Graph, Outputs]:
        """Record one call of ``run``; returns the graph and its static outputs."""
        ...


@dataclass
class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` on ``device``: side-stream warm-up, capture with a private memory pool."""

    device: torch.device

    def warm_up(self, run: Callable[[], Outputs], runs: int) -> None:
        """The docs' recipe: the side stream waits for the current one, and the current one for it."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(runs):
                    run()
            current.wait_stream(side)

    def capture(self, run: Callable[[], Outputs]) -> tuple[Graph, Outputs]:
        """Capture on torch's capture stream; ``thread_local``: other threads' CUDA calls (a server's
        other requests) do not invalidate the capture."""
        with torch.cuda.device(self.device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = run()
        return graph, outputs


def feed_signature(feeds: Mapping[str, Tensor], names: tuple[str, ...]) -> Signature:
    """The capture key of ``feeds``: name, shape, dtype and device of each input, in ``names`` order."""
    return tuple((name, tuple(feeds[name].shape), feeds[name].dtype, feeds[name].device) for name in names)


def _describe(signature: Signature) -> str:
    return ", ".join(f"{name} {list(shape)} {str(dtype).removeprefix('torch.')}" for name, shape, dtype, _ in signature)


@dataclass
class CapturedGraph:
    """One captured forward: its graph, static inputs (by name) and static outputs."""

    graph: Graph
    inputs: dict[str, Tensor]
    outputs: Outputs

    def run(self, feeds: Mapping[str, Tensor]) -> Outputs:
        """Copy ``feeds`` into the static inputs, replay, and return clones of the outputs."""
        for name, static in self.inputs.items():
            static.copy_(feeds[name])
        self.graph.replay()
        return tuple(out.clone() for out in self.outputs)


def _as_tuple(out: Tensor | Outputs) -> Outputs:
    return out if isinstance(out, tuple) else (out,)


class GraphedModule:
    """A torch module taking the spec's inputs positionally, replayed from one CUDA graph per signature.

    ``backend`` ``None`` runs eagerly (the CPU fallback); ``fallback_reason`` says why it does. Calls
    from several threads (the service's workers) take turns: a graph's static buffers are shared, and
    copy-in, replay and clone-out are queued in order on the current stream under one lock.
    """

    def __init__(
        self,
        module: nn.Module | Any,
        spec: ExportSpec,
        backend: GraphBackend | None,
        *,
        warmup_runs: int = 3,
        max_graphs: int = 4,
        fallback_reason: str | None = None,
    ) -> None:
        self.module = module
        self.spec = spec
        self.backend = backend
        self.warmup_runs = warmup_runs
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Signature, CapturedGraph] = OrderedDict()
        self.fallback_reason = fallback_reason if backend is not None else fallback_reason or "no graph backend"
        self.captures = 0
        self._lock = threading.Lock()

    def __call__(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check the feeds against the spec's range, then replay (capturing first for a new signature)."""
        self.spec.check_feeds(feeds)
        with torch.inference_mode():
            outputs = self._replayed(feeds) if not self.fallback_reason else None
            if outputs is None:
                outputs = self._eager(feeds)
        return dict(zip(self.spec.output_names, outputs, strict=True))

    def _replayed(self, feeds: Mapping[str, Tensor]) -> Outputs | None:
        """The outputs from the signature's graph, or None when graphs are off (capture failed)."""
        with self._lock:
            graph = None if self.fallback_reason else self._graph_for(feeds)
            return None if graph is None else graph.run(feeds)

    def _eager(self, feeds: Mapping[str, Tensor]) -> Outputs:
        return _as_tuple(self.module(*(feeds[name] for name in self.spec.input_names)))

    def _graph_for(self, feeds: Mapping[str, Tensor]) -> CapturedGraph | None:
        """The graph of ``feeds``' signature, most recently used last; captured when new."""
        signature = feed_signature(feeds, self.spec.input_names)
        graph = self.graphs.get(signature)
        if graph is not None:
            self.graphs.move_to_end(signature)
            return graph
        graph = self._capture(signature, feeds)
        if graph is not None:
            self.graphs[signature] = graph
            while len(self.graphs) > self.max_graphs:
                dropped, _ = self.graphs.popitem(last=False)
                logger.info("dropped the CUDA graph for %s (max_graphs=%d)", _describe(dropped), self.max_graphs)
        return graph

    def _capture(self, signature: Signature, feeds: Mapping[str, Tensor]) -> CapturedGraph | None:
        """Warm up and capture on static copies of ``feeds``; on failure, run eagerly from now on."""
        assert self.backend is not None
        inputs = {name: feeds[name].clone() for name in self.spec.input_names}

        def run() -> Outputs:
            return _as_tuple(self.module(*inputs.values()))

        try:
            self.backend.warm_up(run, self.warmup_runs)
            graph, outputs = self.backend.capture(run)
        except Exception as exc:  # any failure to capture means eager, never a wrong result
            self._fall_back(f"capturing {self.spec.name} for {_describe(signature)} failed: {exc}")
            return None
        self.captures += 1
        logger.info("captured a CUDA graph of %s for %s", self.spec.name, _describe(signature))
        return CapturedGraph(graph, inputs, outputs)

    def _fall_back(self, reason: str) -> None:
        """Run eagerly from now on; say why once."""
        self.fallback_reason = reason
        self.graphs.clear()
        logger.warning("%s; running it eagerly without CUDA graphs", reason)


@dataclass
class CudaGraphRuntime:
    """Eager PyTorch replayed from CUDA graphs (``torch_cuda_graphs``); eager off CUDA.

    ``channels_last`` converts the module's 4-D weights to channels-last first (:func:`to_channels_last`);
    ``warmup_runs`` eager runs precede each capture; ``max_graphs`` signatures are kept captured.
    ``backend`` builds the graph backend for a device (tests inject a fake; default ``torch.cuda``).
    """

    name: str = "torch_cuda_graphs"
    channels_last: bool = False
    warmup_runs: int = 3
    max_graphs: int = 4
    backend: Callable[[torch.device], GraphBackend] | None = None

    def available(self) -> bool:
        """Always: off CUDA the module runs eagerly (the reason is logged)."""
        return True

    def version(self) -> str:
        """The torch version."""
        return str(torch.__version__)

    def compile(self, request: CompileRequest) -> GraphedModule | TorchModule:
        """The component's module on ``request.device``, behind graphs when a backend is available."""
        module: Any = request.component.module.to(request.device).eval()
        if self.channels_last:
            to_channels_last(module)
        device = torch.device(request.device)
        backend = self._backend_for(device)
        if backend is None:
            logger.warning(
                "%s: CUDA graphs need a CUDA device, %s is not one; running eagerly", request.component.name, device
            )
            return TorchModule(module, request.component.spec)
        return GraphedModule(
            module, request.component.spec, backend, warmup_runs=self.warmup_runs, max_graphs=self.max_graphs
        )

    def _backend_for(self, device: torch.device) -> GraphBackend | None:
        if self.backend is not None:
            return self.backend(device)
        if device.type == "cuda" and torch.cuda.is_available():
            return CudaGraphBackend(device)
        return None


def cuda_graphs_channels_last_runtime() -> CudaGraphRuntime:
    """The ``torch_cuda_graphs_channels_last`` runtime: CUDA graphs over channels-last weights."""
    return CudaGraphRuntime(name="torch_cuda_graphs_channels_last", channels_last=True)
