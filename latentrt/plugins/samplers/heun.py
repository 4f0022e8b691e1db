"""Heun and Heun++ (Karras et al. 2022, Algorithm 2; k-diffusion; ComfyUI's heunpp2)."""

from __future__ import annotations

import math

from torch import Tensor

from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, churn, host_sigmas, report, to_d


def sample_heun(
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
    """Heun's second-order method with optional churn (Karras et al. 2022, Algorithm 2)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = churn(x, sigma, sigma_next, steps, noise, "heun", s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, batch_sigma(sigma_hat, x), cond)
        d = to_d(x, sigma_hat, denoised)  # Algorithm 2 line 7
        report(callback, i, x, sigma_hat, sigma_next, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:  # Algorithm 2 line 8: plain Euler step onto sigma = 0
            x = x + d * dt
            continue
        x_2 = x + d * dt  # Euler predictor, then the trapezoidal corrector (lines 9-11)
        d_2 = to_d(x_2, sigma_next, denoiser(x_2, batch_sigma(sigma_next, x_2), cond))
        x = x + (d + d_2) / 2 * dt
    return x


def _heunpp2_slope(
    denoiser: Denoiser, x: Tensor, d: Tensor, dt: Tensor, sigmas: Tensor, i: int, cond: Conditioning | None
) -> Tensor:
    """Heun++ slope for the step ``sigmas[i] -> sigmas[i + 1]``: slopes blended with weights ``sigma / (k sigma_0)``.

    Two slopes (Heun predictor) when ``sigmas[i + 2]`` is the last sigma, otherwise three: the
    predictor continues one more Euler step to ``sigmas[i + 2]`` for a third slope.
    """
    sigma_next, sigma_0 = sigmas[i + 1], sigmas[0]
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_next, denoiser(x_2, batch_sigma(sigma_next, x_2), cond))
    if sigmas[i + 2] == sigmas[-1]:
        w_2 = sigma_next / (2 * sigma_0)
        return (1 - w_2) * d + w_2 * d_2
    sigma_after = sigmas[i + 2]
    x_3 = x_2 + d_2 * (sigma_after - sigma_next)
    d_3 = to_d(x_3, sigma_after, denoiser(x_3, batch_sigma(sigma_after, x_3), cond))
    w_2, w_3 = sigma_next / (3 * sigma_0), sigma_after / (3 * sigma_0)
    return (1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3


def sample_heunpp2(
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
    """Heun++ with a third slope (ComfyUI's heunpp2, after Carzit's sd-webui-samplers-scheduler)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = churn(x, sigma, sigma_next, steps, noise, "heunpp2", s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, batch_sigma(sigma_hat, x), cond)
        d = to_d(x, sigma_hat, denoised)
        report(callback, i, x, sigma_hat, sigma_next, denoised)
        dt = sigma_next - sigma_hat
        last = bool(sigma_next == sigmas[-1])  # the last step is plain Euler
        x = x + (d if last else _heunpp2_slope(denoiser, x, d, dt, sigmas, i, cond)) * dt
    return x


def register(registry: Registry) -> None:
    """Register heun and heunpp2."""
    registry.add_sampler("heun", sample_heun, label="Heun", aliases=("k_heun",), noise="gaussian")
    registry.add_sampler("heunpp2", sample_heunpp2, label="HeunPP2", noise="gaussian")


__all__ = ["register", "sample_heun", "sample_heunpp2"]
