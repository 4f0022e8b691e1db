"""Discrete-time model sampling: the map between training timesteps and sigmas.

A DDPM-trained model (Ho et al. 2020, https://arxiv.org/abs/2006.11239) sees 1000
timesteps with cumulative signal rates ``alpha_bar_t``; in the k-diffusion view its
noise level is ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``. Timesteps between
the table entries are interpolated linearly in ``log sigma``, as k-diffusion's
``DiscreteSchedule`` and ComfyUI's ``ModelSamplingDiscrete`` do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DiscreteModelSampling", "scaled_linear_betas", "sd_model_sampling"]


def scaled_linear_betas(beta_start: float, beta_end: float, timesteps: int) -> Tensor:
    """Stable Diffusion's ``scaled_linear`` betas: linear in ``sqrt(beta)``, float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


@dataclass(frozen=True)
class DiscreteModelSampling:
    """Sigma table of a discrete-timestep model, with log-sigma interpolation.

    ``sigmas`` is float32 (as the models' tables are stored) and increasing with t.
    """

    sigmas: Tensor
    _tables: dict[torch.device, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas: Tensor) -> DiscreteModelSampling:
        """Build from betas: ``alpha_bar = cumprod(1 - beta)``, ``sigma = sqrt((1 - a) / a)``."""
        alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return cls(sigmas=sigmas.to(torch.float32))

    @property
    def log_sigmas(self) -> Tensor:
        """``log(sigmas)`` in float64, the space timesteps are interpolated in."""
        return self.sigmas.to(torch.float64).log()

    @property
    def sigma_min(self) -> float:
        """Smallest trained sigma (timestep 0)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest trained sigma (last timestep)."""
        return float(self.sigmas[-1])

    @property
    def alphas_cumprod(self) -> Tensor:
        """``alpha_bar_t = 1 / (1 + sigma_t^2)``, for DDIM-style samplers."""
        return 1.0 / (1.0 + self.sigmas.to(torch.float64) ** 2)

    def log_sigmas_on(self, device: torch.device) -> Tensor:
        """:attr:`log_sigmas` on ``device``, moved there once: a copy per step would make the host wait for the GPU."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.log_sigmas.to(device)
        return table

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep of ``sigma``: piecewise linear in log-sigma, clamped to the table."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self.log_sigmas_on(sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).clamp(min=1e-10).log().reshape(-1)
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.reshape(sigma.shape).to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at continuous timestep ``t``: ``exp`` of the interpolated log-sigma."""
        t = torch.as_tensor(t)
        log_sigmas = self.log_sigmas_on(t.device)
        t_f = t.to(log_sigmas.dtype).clamp(0, len(log_sigmas) - 1)
        low_idx, high_idx, w = t_f.floor().long(), t_f.ceil().long(), t_f.frac()
        log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
        dtype = t.dtype if t.is_floating_point() else torch.float32
        return log_sigma.exp().to(dtype)


def sd_model_sampling(
    beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000
) -> DiscreteModelSampling:
    """The Stable Diffusion 1.x/2.x/SDXL schedule: scaled_linear betas 0.00085..0.012, 1000 steps."""
    return DiscreteModelSampling.from_betas(scaled_linear_betas(beta_start, beta_end, timesteps))
