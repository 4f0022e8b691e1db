"""Built-in sigma schedules: pure functions ``(steps, model_sampling) -> sigmas``.

Names follow ComfyUI; A1111 labels are aliases. Each returns ``steps + 1`` float32
sigmas, decreasing, ending in 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentrt.core.hookspecs import hookimpl
from latentrt.core.protocols import ModelSampling
from latentrt.core.registry import Registry


def append_zero(sigmas: Tensor) -> Tensor:
    """``sigmas`` followed by a final 0."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. 5: evenly spaced in ``sigma^(1/rho)``."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).to(torch.float32)


def karras(steps: int, model_sampling: ModelSampling) -> Tensor:
    """Karras et al. 2022 schedule (rho = 7) between the model's sigma_min and sigma_max."""
    return karras_sigmas(steps, model_sampling.sigma_min, model_sampling.sigma_max)


@hookimpl
def latentrt_register(registry: Registry) -> None:
    """Register every built-in schedule."""
    registry.add_scheduler("karras", karras, label="Karras")
