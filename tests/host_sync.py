"""A fake accelerator on the CPU that catches host syncs: tensors marked :class:`OnDevice` play CUDA tensors.

Inside :class:`FakeAccelerator` an ``OnDevice`` tensor reports ``device cuda:0`` and every operation on
it stays ``OnDevice``; plain tensors are host (CPU) tensors. Once armed, it raises :class:`HostSync` on
what would block the host on a real GPU:

* device -> host: ``item``, ``bool``/``float``/``int`` (a Python ``if`` on a tensor), ``tolist``, ``cpu``,
  ``numpy``, ``.to("cpu")``, ``torch.equal``/``allclose``, data-dependent shapes (``nonzero``, ...);
* host -> device: ``.to("cuda")``/``.cuda()``/``copy_`` of a host tensor and ``torch.tensor(..., device=cuda)``
  (a blocking copy: PyTorch synchronizes the stream after it); ``non_blocking=True`` copies (from
  pinned memory: ``pin_memory()`` is a no-op here) are allowed.

It also raises :class:`DeviceMismatch` where CUDA would refuse to mix devices: a host tensor with
dimensions in an operation on device tensors (0-dim host tensors are fine: CUDA kernels take them as
scalars). Factories with ``device=cuda`` (``full``, ``zeros``, ``randn``) are kernel launches: allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["DeviceMismatch", "FakeAccelerator", "HostSync", "OnDevice", "on_device"]

CUDA = torch.device("cuda", 0)
DEVICE_TO_HOST = frozenset(
    {
        "item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "tolist", "numpy", "cpu",
        "__array__", "equal", "allclose", "is_nonzero", "nonzero", "masked_select", "unique", "argwhere",
    }
)  # fmt: skip
FROM_HOST_DATA = frozenset({"tensor", "as_tensor", "asarray", "from_numpy"})


class HostSync(AssertionError):
    """An operation that would make the host wait for the GPU (or a blocking host-to-device copy)."""


class DeviceMismatch(AssertionError):
    """An operation CUDA would refuse: a host tensor with dimensions mixed with device tensors."""


class OnDevice(Tensor):
    """A CPU tensor playing one on the accelerator."""


def on_device(t: Tensor) -> OnDevice:
    """``t`` marked as living on the fake accelerator."""
    return t.as_subclass(OnDevice)


def _plain(t: Tensor) -> Tensor:
    return t.as_subclass(Tensor)


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class FakeAccelerator(TorchFunctionMode):
    """Counts what is allowed before :meth:`arm`; raises on host syncs after it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.before_arming: list[str] = []

    def arm(self) -> None:
        """From now on, a host sync raises."""
        self.armed = True

    @contextmanager
    def disarmed(self) -> Iterator[None]:
        """Allow host syncs for a moment (test scaffolding that would run on the host anyway)."""
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = armed

    def _sync(self, what: str) -> None:
        if self.armed:
            raise HostSync(f"host sync inside the sampling loop: {what}")
        self.before_arming.append(what)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if func == Tensor.device.__get__ and isinstance(first, OnDevice):
            return CUDA
        if name in ("pin_memory", "is_pinned") and not isinstance(first, OnDevice):  # no CUDA here to pin with
            return first if name == "pin_memory" else True
        if name in ("to", "cuda", "copy_") and isinstance(first, Tensor):
            return self._transfer(func, name, args, kwargs)
        if name in DEVICE_TO_HOST and _touches_device(args, kwargs):
            self._sync(f"{name}() of a device tensor")
            return func(*_unwrapped(args), **kwargs)
        if _is_cuda(kwargs.get("device")):
            if name in FROM_HOST_DATA:
                self._sync(f"torch.{name}(..., device=cuda) copies host data")
            return on_device(func(*args, **{**kwargs, "device": "cpu"}))
        _check_devices(name, args, kwargs)
        return func(*args, **kwargs)

    def _transfer(self, func: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``to``/``cuda``/``copy_``: device moves are checked and simulated by re-marking the tensor."""
        source = args[0]
        if name == "copy_":
            other = args[1]
            if isinstance(source, OnDevice) != isinstance(other, OnDevice):
                self._sync("copy_ between host and device")
            return func(source, _plain(other) if not isinstance(source, OnDevice) else other, *args[2:], **kwargs)
        if name == "cuda":
            target, dtype, non_blocking = CUDA, None, bool(kwargs.get("non_blocking", False))
        elif len(args) > 1 and isinstance(args[1], Tensor):  # to(other): other's device and dtype
            target = CUDA if isinstance(args[1], OnDevice) else torch.device("cpu")
            dtype, non_blocking = args[1].dtype, bool(kwargs.get("non_blocking", False))
        else:
            target, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        if target is None:
            return func(*args, **kwargs)
        to_device = _is_cuda(target)
        if to_device != isinstance(source, OnDevice) and not (to_device and non_blocking):
            direction = "host -> device" if to_device else "device -> host"
            self._sync(f"{name}() {direction} copy of shape {list(source.shape)}")
        moved = _plain(source) if dtype is None else _plain(source).to(dtype)
        return on_device(moved) if to_device else moved


def _touches_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    leaves, _ = tree_flatten((args, kwargs))
    return any(isinstance(leaf, OnDevice) for leaf in leaves)


def _unwrapped(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_plain(a) if isinstance(a, OnDevice) else a for a in args)


def _check_devices(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """CUDA refuses host tensors with dimensions next to device tensors (0-dim host tensors are scalars)."""
    leaves, _ = tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    if any(isinstance(t, OnDevice) for t in tensors):
        host = [list(t.shape) for t in tensors if not isinstance(t, OnDevice) and t.ndim > 0]
        if host and name not in ("as_subclass", "__get__", "__set__"):
            raise DeviceMismatch(f"{name}: host tensor(s) of shape {host} mixed with device tensors")
