"""DPM2 and DPM2 ancestral: DPM-Solver-2 steps in sigma (Lu et al. 2022; k-diffusion)."""

from __future__ import annotations

import math

from torch import Tensor

from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import ancestral_step, batch_sigma, churn, host_sigmas, report, require_noise, to_d


def _midpoint_step(
    denoiser: Denoiser, x: Tensor, d: Tensor, sigma: Tensor, sigma_to: Tensor, cond: Conditioning | None
) -> Tensor:
    """One DPM-Solver-2 step ``sigma -> sigma_to``: the slope is taken at the midpoint in log sigma.

    With ``d = dx/dsigma`` at ``sigma``: Euler to ``sigma_mid = sqrt(sigma * sigma_to)``, then the
    full step with the slope there (DPM-Solver-2, Lu et al. 2022 Algorithm 1 with r1 = 1/2).
    """
    sigma_mid = (sigma.log() + sigma_to.log()).div(2).exp()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, denoiser(x_mid, batch_sigma(sigma_mid, x_mid), cond))
    return x + d_mid * (sigma_to - sigma)


def sample_dpm_2(
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
    """DPM-Solver-2 steps with Karras churn (k-diffusion's sample_dpm_2; Karras et al. 2022, Algorithm 2)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = churn(x, sigma, sigma_next, steps, noise, "dpm_2", s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, batch_sigma(sigma_hat, x), cond)
        d = to_d(x, sigma_hat, denoised)
        report(callback, i, x, sigma_hat, sigma_next, denoised)
        if sigma_next == 0:  # log sigma is -inf at 0: plain Euler step
            x = x + d * (sigma_next - sigma_hat)
        else:
            x = _midpoint_step(denoiser, x, d, sigma_hat, sigma_next, cond)
    return x


def sample_dpm_2_ancestral(
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
    """Ancestral sampling with DPM-Solver-2 steps down to sigma_down, then noise up to sigma_next (k-diffusion)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    noise_source = require_noise(noise, "dpm_2_ancestral") if eta > 0 else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, sigma_next, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:  # Euler step onto 0; like k-diffusion, no noise is added after it
            x = x + d * (sigma_down - sigma)
            continue
        x = _midpoint_step(denoiser, x, d, sigma, sigma_down, cond)
        if noise_source is not None:
            x = x + noise_source(sigma, sigma_next) * s_noise * sigma_up
    return x


def register(registry: Registry) -> None:
    """Register dpm_2 and dpm_2_ancestral (both run on a schedule without its penultimate sigma)."""
    registry.add_sampler(
        "dpm_2", sample_dpm_2, label="DPM2", aliases=("k_dpm_2",), noise="gaussian", discard_penultimate_sigma=True
    )
    registry.add_sampler(
        "dpm_2_ancestral",
        sample_dpm_2_ancestral,
        label="DPM2 a",
        aliases=("k_dpm_2_a",),
        noise="gaussian",
        discard_penultimate_sigma=True,
    )


__all__ = ["register", "sample_dpm_2", "sample_dpm_2_ancestral"]
