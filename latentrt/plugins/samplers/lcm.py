"""LCM multistep sampling (Luo et al. 2023, "Latent Consistency Models", https://arxiv.org/abs/2310.04378).

A consistency model maps any noisy latent straight to ``x0``; multistep sampling (their Algorithm 1)
alternates that jump with re-noising to the next, lower noise level. The consistency boundary condition
``c_skip(t) * x + c_out(t) * F(x, t)`` is part of the model's parameterization, so it lives in the
denoiser adapter (ComfyUI's ``lcm`` model sampling), not here: the sampler only sees ``x0``.
"""

from __future__ import annotations

from torch import Tensor

from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, host_sigmas, report, require_noise


def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """LCM multistep sampling (Luo et al. 2023, Algorithm 1): jump to ``x0``, re-noise to ``sigma_next``."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    noise_source = require_noise(noise, "lcm")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        x = denoised
        if sigma_next > 0:  # x ~ q(x_next | x0): x0 + sigma_next * z
            x = x + sigma_next * noise_source(sigma, sigma_next)
    return x


def register(registry: Registry) -> None:
    """Register lcm."""
    registry.add_sampler("lcm", sample_lcm, label="LCM", noise="gaussian")


__all__ = ["register", "sample_lcm"]
