"""DDIM (Song et al. 2020) and DDPM (Ho et al. 2020) written in k-diffusion's sigma coordinates.

With ``alpha_bar = 1 / (1 + sigma^2)`` a VP latent ``x_vp`` is ``x / sqrt(1 + sigma^2)``, and both
samplers become short formulas in ``x = x0 + sigma * eps``:

* DDIM, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502, eq. 12:
  ``x_next = x0 + sqrt(sigma_next^2 - sigma_up^2) * eps + sigma_up * z``, with DDIM's
  ``sigma_t(eta)`` (their eq. 16) becoming ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)``.
  At ``eta = 0`` this is exactly an Euler step of the probability-flow ODE, which is why ComfyUI runs
  its ``ddim`` as ``euler``.
* DDPM, "Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2006.11239, eq. 7: the
  posterior ``q(x_next | x, x0)`` has mean ``x0 + (sigma_next / sigma)^2 * (x - x0)`` and standard
  deviation ``sigma_next * sqrt(1 - sigma_next^2 / sigma^2)`` (ComfyUI's ``sample_ddpm``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, host_sigmas, report, require_noise


def _posterior_std(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Std of the DDPM posterior in sigma coordinates: ``sigma_next * sqrt(1 - (sigma_next / sigma)^2)``."""
    return sigma_next * (1 - (sigma_next / sigma) ** 2) ** 0.5


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12): ``eta = 0`` is deterministic, ``eta = 1`` samples as DDPM does."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    noise_source = require_noise(noise, "ddim") if eta > 0 else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        eps = (x - denoised) / sigma  # the eps prediction DDIM reuses ("direction pointing to x_t")
        sigma_up = torch.minimum(eta * _posterior_std(sigma, sigma_next), sigma_next)  # DDIM eq. 16
        x = denoised + (sigma_next**2 - sigma_up**2) ** 0.5 * eps
        if noise_source is not None and sigma_next > 0:
            x = x + sigma_up * noise_source(sigma, sigma_next)
    return x


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020): draw each step from the posterior ``q(x_next | x, x0)``."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    noise_source = require_noise(noise, "ddpm")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        x = denoised + (sigma_next / sigma) ** 2 * (x - denoised)  # posterior mean, Ho et al. eq. 7
        if sigma_next > 0:
            x = x + _posterior_std(sigma, sigma_next) * noise_source(sigma, sigma_next)
    return x


def register(registry: Registry) -> None:
    """Register ddim and ddpm."""
    registry.add_sampler("ddim", sample_ddim, label="DDIM", noise="gaussian")
    registry.add_sampler("ddpm", sample_ddpm, label="DDPM", noise="gaussian")


__all__ = ["register", "sample_ddim", "sample_ddpm"]
