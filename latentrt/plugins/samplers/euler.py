"""Euler and Euler ancestral (Karras et al. 2022, Algorithm 2; k-diffusion)."""

from __future__ import annotations

import math

from torch import Tensor

from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import ancestral_step, batch_sigma, churn, host_sigmas, report, require_noise, to_d


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler's method on the probability-flow ODE, with optional churn (Karras Algorithm 2)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = churn(x, sigma, sigma_next, steps, noise, "euler", s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, batch_sigma(sigma_hat, x), cond)
        d = to_d(x, sigma_hat, denoised)
        report(callback, i, x, sigma_hat, sigma_next, denoised)
        x = x + d * (sigma_next - sigma_hat)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral sampling with Euler steps: step down to sigma_down, add noise up to sigma_next."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    noise_source = require_noise(noise, "euler_ancestral") if eta > 0 else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, sigma_next, denoised)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if noise_source is not None and sigma_next > 0:
            x = x + noise_source(sigma, sigma_next) * s_noise * sigma_up
    return x


def register(registry: Registry) -> None:
    """Register euler and euler_ancestral."""
    registry.add_sampler("euler", sample_euler, label="Euler", aliases=("k_euler",), noise="gaussian")
    registry.add_sampler(
        "euler_ancestral",
        sample_euler_ancestral,
        label="Euler a",
        aliases=("k_euler_a", "k_euler_ancestral"),
        noise="gaussian",
    )


__all__ = ["register", "sample_euler", "sample_euler_ancestral"]
