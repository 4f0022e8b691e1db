"""Weights stored in reduced precision, computed one layer at a time in the compute precision.

``load(path, dtype="fp32", storage_dtype="fp16")`` keeps the large weights (the matrices of
``Linear``, ``Conv1d``/``Conv2d`` and ``Embedding`` layers, >99% of a UNet's bytes) in fp16 or bf16
and upcasts each layer's weight to the compute dtype only while that layer runs (the same idea as
diffusers' ``enable_layerwise_casting`` and ComfyUI's "manual cast" layers). The SD 1.5 UNet then
takes 1.7 GB instead of 3.4 GB at fp32 quality of arithmetic; what is lost is what the weights lose
by rounding to 16 bits, which an fp16 checkpoint has already lost.

While loading, each tensor is converted straight from the file to the storage dtype, so no
full-precision copy of the model exists at any time; at run time one layer's upcast weight lives
at a time. Norm layers and loose parameters (position tables, a projection matrix) stay in the
compute dtype: they are small and precision-sensitive.

The casting is in each layer's ``forward`` (a method bound on the instance), never by swapping
parameters in and out, so concurrent calls from several threads are safe.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from latentrt.core.errors import InvalidRequest

__all__ = [
    "STORED_LAYERS",
    "compute_dtype",
    "install_layerwise_casting",
    "storage_dtype",
    "stored_parameter_names",
    "storing",
]

STORED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
"""Layers whose weights are kept in the storage dtype (exact types only: subclasses may compute differently)."""
_COMPUTE_ATTR = "_latentrt_compute_dtype"
_storage: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("latentrt_storage_dtype", default=None)


@contextlib.contextmanager
def storing(dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, :func:`latentrt.core.checkpoint.load_module` stores layer weights in ``dtype``."""
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise InvalidRequest(f"storage_dtype must be fp16 or bf16, got {dtype}")
    token = _storage.set(dtype)
    try:
        yield
    finally:
        _storage.reset(token)


def storage_dtype(compute: torch.dtype | None) -> torch.dtype | None:
    """The storage dtype in effect for a module computed in ``compute`` (None: store as computed)."""
    stored = _storage.get()
    if stored is None or compute is None or stored == compute or not compute.is_floating_point:
        return None
    return stored


def _stored_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((name, layer) for name, layer in module.named_modules() if type(layer) in STORED_LAYERS)


def stored_parameter_names(module: nn.Module) -> set[str]:
    """State-dict names of the parameters that :func:`install_layerwise_casting` stores reduced."""
    names = set()
    for prefix, layer in _stored_layers(module):
        for name, parameter in layer.named_parameters(recurse=False):
            if parameter is not None:
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def install_layerwise_casting(module: nn.Module, compute: torch.dtype) -> nn.Module:
    """Make every stored layer of ``module`` upcast its weights to ``compute`` as it runs.

    The parameters must already be in their storage dtype (``load_module`` does that);
    ``compute_dtype(module)`` afterwards answers ``compute``.
    """
    for _, layer in _stored_layers(module):
        layer.forward = types.MethodType(_CAST_FORWARDS[type(layer)], layer)
        setattr(layer, _COMPUTE_ATTR, compute)
    setattr(module, _COMPUTE_ATTR, compute)
    return module


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: the compute dtype of layerwise casting, else its first parameter's."""
    dtype = getattr(module, _COMPUTE_ATTR, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype


def _up(tensor: Tensor | None, like: Tensor) -> Tensor | None:
    return None if tensor is None else tensor.to(like.dtype)


def _linear(self: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, self.weight.to(x.dtype), _up(self.bias, x))


def _conv(self: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    out: Tensor = self._conv_forward(x, self.weight.to(x.dtype), _up(self.bias, x))
    return out


def _embedding(self: nn.Embedding, ids: Tensor) -> Tensor:
    # look rows up in storage, then upcast the rows: exact (fp16/bf16 -> fp32 is lossless)
    # and far cheaper than upcasting a 49408-row token table
    rows = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq)
    return rows.to(compute_dtype(self))


_CAST_FORWARDS: dict[type[nn.Module], Any] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Embedding: _embedding,
}
