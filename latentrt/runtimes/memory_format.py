"""Channels-last (NHWC) weights for convolutional networks: the UNet and the VAE.

On NVIDIA GPUs cuDNN's fp16/bf16 convolutions run natively in NHWC; with NCHW weights every
convolution transposes on the fly. ``to_channels_last`` converts a module's 4-D parameters and buffers
once (https://pytorch.org/tutorials/intermediate/memory_format_tutorial.html); convolutions then
return channels-last activations and the layers between them keep the format. Values are unchanged:
only strides differ, so outputs equal the default format's up to kernel rounding.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

__all__ = ["is_channels_last", "to_channels_last"]

M = TypeVar("M", bound=nn.Module)


def to_channels_last(module: M) -> M:
    """Convert ``module``'s 4-D parameters and buffers to ``torch.channels_last`` in place; returns it.

    What ``module.to(memory_format=torch.channels_last)`` does, the tensors' values untouched.
    """
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.ndim == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


def is_channels_last(module: nn.Module) -> bool:
    """Whether every 4-D parameter of ``module`` is channels-last (and it has at least one)."""
    weights = [p for p in module.parameters() if p.ndim == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
