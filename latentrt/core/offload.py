"""Sequential component offload: one network resident at a time (text encoder -> UNet -> VAE).

``load(path, offload="sequential")`` for machines whose memory holds the largest network but not
all of them. Each component's torch modules get a hook that, when the component runs, makes it
resident and parks the component that ran before (diffusers' ``enable_model_cpu_offload`` is the
GPU form of the same idea):

* **CUDA**: a parked component's modules move to host memory (``module.to("cpu")``) and come back
  to the GPU when next called. A component still running in another thread is never parked.
* **CPU**: a parked component's weights stay where they are but leave the resident set: they are
  memory-mapped file pages, which ``madvise(MADV_DONTNEED)`` drops and the kernel reads back on
  the next touch (from the page cache when memory allows, else from disk). Weights that are not
  file-backed already (converted to another dtype while loading) are first written once to an
  anonymous spill file under ``$LATENTRT_CACHE/offload`` (unlinked as soon as it is mapped, so
  nothing is left behind) and mapped from there. Unlike anonymous memory, parked pages are clean
  page cache the kernel can reclaim under pressure without swap, so what the process pins is
  one network plus its activations.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from latentrt.core.errors import InvalidRequest
from latentrt.core.memory import file_mappings, release_file_pages, return_freed_heap

__all__ = [
    "OFFLOAD_MODES",
    "ComponentOffload",
    "OffloadGroup",
    "component_modules",
    "enable_sequential_offload",
    "file_back_loaded",
    "spilling",
]

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "sequential")
_SUFFIX = ".safetensors"
_spilling: contextvars.ContextVar[bool] = contextvars.ContextVar("latentrt_offload_spilling", default=False)


@contextlib.contextmanager
def spilling(device: torch.device | None) -> Iterator[None]:
    """While loading for offload on a CPU ``device`` (None: no offload), each module is file-backed and
    parked as soon as it is loaded, so loading holds one converted network at a time, not the model."""
    token = _spilling.set(device is not None and device.type == "cpu")
    try:
        yield
    finally:
        _spilling.reset(token)


def file_back_loaded(module: nn.Module) -> None:
    """Called by ``load_module`` on each module it loads: inside :func:`spilling`, give the module's
    converted weights a file mapping and drop them from the resident set."""
    if not _spilling.get():
        return
    _file_back(module, None)
    mappings = file_mappings(_SUFFIX)
    for tensor in _tensors([module]):
        release_file_pages(tensor, mappings)
    return_freed_heap()  # the converted copies just freed


def component_modules(component: object, depth: int = 3) -> list[nn.Module]:
    """The torch modules a pipeline component (text encoder, denoiser, VAE) runs, outermost first.

    A component is either a module itself or a wrapper holding modules in its attributes (SD's
    denoiser holds its UNet, SDXL's text encoder its two CLIP models); wrappers are searched
    ``depth`` levels deep. Compiled stand-ins (ONNX Runtime, TensorRT) hold no torch modules.
    """
    found: list[nn.Module] = []
    _collect(component, depth, found, set())
    return found


def _collect(value: object, depth: int, found: list[nn.Module], seen: set[int]) -> None:
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, nn.Module):
        found.append(value)
        return
    if depth == 0 or isinstance(value, (str, bytes, int, float, bool, Tensor, type)) or value is None:
        return
    children: Iterable[object]
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, (list, tuple)):
        children = value
    else:
        children = getattr(value, "__dict__", {}).values()
    for child in children:
        _collect(child, depth - 1, found, seen)


@dataclass
class ComponentOffload:
    """One component's modules and the way they are parked and brought back."""

    name: str
    modules: list[nn.Module]
    device: torch.device
    running: int = 0
    resident: bool = True

    def park(self) -> None:
        """Move the weights off the compute device (CUDA) or out of the resident set (CPU)."""
        if self.device.type == "cpu":
            mappings = file_mappings(_SUFFIX)
            for tensor in _tensors(self.modules):
                release_file_pages(tensor, mappings)
        else:
            for module in self.modules:
                module.to("cpu")
        self.resident = False

    def bring(self) -> None:
        """Make the weights usable on the compute device again (CPU: pages come back on touch)."""
        if self.device.type != "cpu":
            for module in self.modules:
                module.to(self.device)
        self.resident = True


@dataclass
class OffloadGroup:
    """The components of one model, of which only the last one called stays resident."""

    components: dict[str, ComponentOffload]
    active: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, name: str) -> None:
        """``name`` is about to run: make it resident, park the others that are not running."""
        with self.lock:
            component = self.components[name]
            component.running += 1
            if self.active == name and component.resident:
                return
            for other in self.components.values():
                if other is not component and other.resident and other.running == 0:
                    other.park()
            if not component.resident:
                component.bring()
            self.active = name

    def leave(self, name: str) -> None:
        """``name`` finished one call."""
        with self.lock:
            self.components[name].running -= 1

    def park_all(self) -> None:
        """Park every component that is not running (after loading, and between requests)."""
        with self.lock:
            for component in self.components.values():
                if component.resident and component.running == 0:
                    component.park()
            self.active = None


def enable_sequential_offload(
    components: dict[str, object], device: torch.device, spill_dir: Path | None = None
) -> OffloadGroup:
    """Offload ``components`` (name -> pipeline component) one at a time; see the module doc."""
    group = OffloadGroup({})
    for name, component in components.items():
        modules = component_modules(component)
        if not modules:
            continue
        if device.type == "cpu":
            for module in modules:
                _file_back(module, spill_dir)
        group.components[name] = ComponentOffload(name, modules, device)
        for module in modules:
            _hook(module, group, name)
        _wrap_entry_points(component, group, name)
    group.park_all()
    logger.info("sequential offload: %s, one resident at a time", ", ".join(group.components) or "nothing")
    return group


def _hook(root: nn.Module, group: OffloadGroup, name: str) -> None:
    """Enter/leave around calls of the root module (a UNet); components that run their modules
    through methods instead (a VAE's ``decode`` calls its ``decoder``) are entered through
    :data:`ENTRY_POINTS`. Nested calls only count."""

    def before(module: nn.Module, args: Any) -> None:
        group.enter(name)

    def after(module: nn.Module, args: Any, output: Any) -> None:
        group.leave(name)

    root.register_forward_pre_hook(before)
    root.register_forward_hook(after, always_call=True)


ENTRY_POINTS = ("encode", "decode")
"""A component's methods that may read where its weights are before any module runs (a VAE moves
its input to its weights' device first): entered as a whole, so the weights are in place by then."""


def _wrap_entry_points(component: object, group: OffloadGroup, name: str) -> None:
    for method in ENTRY_POINTS:
        inner = getattr(component, method, None)
        if callable(inner):
            object.__setattr__(component, method, _entered(inner, group, name))


def _entered(inner: Callable[..., Any], group: OffloadGroup, name: str) -> Callable[..., Any]:
    @functools.wraps(inner)
    def call(*args: Any, **kwargs: Any) -> Any:
        group.enter(name)
        try:
            return inner(*args, **kwargs)
        finally:
            group.leave(name)

    return call


def _tensors(modules: Iterable[nn.Module]) -> Iterator[Tensor]:
    for module in modules:
        yield from module.parameters()
        yield from module.buffers()


def _file_back(module: nn.Module, spill_dir: Path | None) -> None:
    """Give every CPU tensor of ``module`` that is not already a file mapping one in a spill file."""
    mappings = file_mappings(_SUFFIX)
    loose = {
        f"{prefix}.{name}" if prefix else name: (owner, name, tensor)
        for prefix, owner in module.named_modules()
        for name, tensor in [*owner._parameters.items(), *owner._buffers.items()]
        if tensor is not None and tensor.device.type == "cpu" and tensor.numel() and not _mapped(tensor, mappings)
    }
    if not loose:
        return
    mapped = _spill({key: tensor for key, (_, _, tensor) in loose.items()}, spill_dir)
    for key, (owner, name, _) in loose.items():
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(mapped[key], requires_grad=False)
        else:
            owner._buffers[name] = mapped[key]


def _mapped(tensor: Tensor, mappings: list[tuple[int, int]]) -> bool:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(low <= start and end <= high for low, high in mappings)


def _spill(tensors: dict[str, Tensor], spill_dir: Path | None) -> dict[str, Tensor]:
    """``tensors`` written to a new safetensors file and read back memory-mapped; the file is
    unlinked at once (the mapping keeps its pages reachable until the process lets go of it)."""
    from safetensors import safe_open

    from latentrt.exporters.cache import cache_root

    folder = spill_dir or cache_root() / "offload"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(suffix=_SUFFIX, dir=folder)
    except OSError as exc:
        raise InvalidRequest(f"offload needs a writable folder for spilled weights: {folder}: {exc}") from exc
    os.close(handle)
    try:
        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, name)
        opened = safe_open(name, framework="pt", device="cpu")
        return {key: opened.get_tensor(key) for key in tensors}
    finally:
        os.unlink(name)
