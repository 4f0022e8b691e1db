"""The one place model parameterization lives: backbone predictions -> ``x0`` (DESIGN.md section 2).

A discrete-time backbone (an SD UNet, an ONNX or TensorRT engine) is called on the
variance-preserving input ``c_in * x`` at timestep ``t = sigma_to_t(sigma)`` and predicts
either the noise (``eps``) or the velocity (``v``, Salimans & Ho 2022,
https://arxiv.org/abs/2202.00512). In k-diffusion's variance-exploding terms (Karras et
al. 2022, Table 1):

* eps: ``c_in = 1 / sqrt(sigma^2 + 1)``, ``x0 = x - sigma * eps``;
* v:   ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``,
  ``x0 = c_skip * x + c_out * v``.

Samplers never see any of this; they see ``denoiser(x, sigma, cond) -> x0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.model_sampling import DiscreteModelSampling
from latentrt.core.protocols import Conditioning
from latentrt.core.sampling import append_dims

__all__ = ["Backbone", "DiscreteDenoiser", "Prediction"]

Prediction = Literal["eps", "v"]
Backbone = Callable[..., Tensor]
"""``backbone(sample, timestep, context, **cond.extra) -> prediction`` (SDXL's ``y`` rides in extra)."""


@dataclass
class DiscreteDenoiser:
    """Wraps a discrete-timestep eps- or v-prediction backbone into a k-diffusion denoiser."""

    backbone: Backbone
    model_sampling: DiscreteModelSampling
    prediction: Prediction = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise InvalidRequest(f"prediction must be 'eps' or 'v', got {self.prediction!r}")

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None) -> Tensor:
        """``x0`` estimate for ``x = x0 + sigma * eps``; ``sigma`` has shape ``[batch]``."""
        if cond is None:
            raise InvalidRequest("a Stable Diffusion denoiser needs conditioning (cond=...)")
        s = append_dims(sigma.to(device=x.device, dtype=torch.float32), x.ndim)
        c_in = (s**2 + 1) ** -0.5
        t = self.model_sampling.sigma_to_t(sigma.to(torch.float32))
        out = self.backbone((x * c_in).to(x.dtype), t.to(x.device), cond.context, **cond.extra)
        if self.prediction == "eps":
            return (x - s * out).to(x.dtype)
        c_skip, c_out = 1 / (s**2 + 1), -s * c_in
        return (c_skip * x + c_out * out).to(x.dtype)
