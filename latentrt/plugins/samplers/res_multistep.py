"""RES second-order multistep sampler (Zhang et al. 2023, https://arxiv.org/abs/2308.02157).

Follows ComfyUI's ``res_multistep``: an exponential integrator in ``t = -log(sigma)``
for the data-prediction ODE ``dx/dt = D(x, t) - x``. Over a step ``h`` it integrates
``D`` exactly as the line through the current and the previous evaluation,
``x_next = exp(-h) x + h (b1 D + b2 D_old)`` with ``b1 = phi_1(-h) - phi_2(-h) / c2``,
``b2 = phi_2(-h) / c2`` and ``c2`` the previous evaluation's time relative to the step
(RES's second-order multistep coefficients). The first and last steps are Euler.
"""

from __future__ import annotations

from torch import Tensor

from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import ancestral_step, batch_sigma, host_sigmas, report, require_noise, to_d


def _t(sigma: Tensor) -> Tensor:
    """Exponential-integrator time ``t = -log(sigma)``."""
    return sigma.log().neg()


def res_step(
    x: Tensor, sigma: Tensor, sigma_to: Tensor, h_last: Tensor, denoised: Tensor, old_denoised: Tensor
) -> Tensor:
    """One RES multistep step ``sigma -> sigma_to``; ``old_denoised`` was evaluated ``h_last`` earlier in t."""
    h = _t(sigma_to) - _t(sigma)
    c2 = -h_last / h  # the previous evaluation's time, relative to this step, in units of h
    phi_1 = (-h).expm1() / (-h)  # phi_1(z) = (e^z - 1) / z at z = -h
    phi_2 = (phi_1 - 1) / (-h)  # phi_2(z) = (phi_1(z) - 1) / z
    b2 = phi_2 / c2
    b1 = phi_1 - b2
    return (-h).exp() * x + h * (b1 * denoised + b2 * old_denoised)


def _res_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Conditioning | None,
    noise: NoiseSource | None,
    callback: SamplerCallback | None,
    eta: float,
    s_noise: float,
) -> Tensor:
    """RES multistep with ancestral noise ``eta`` (0: deterministic), as ComfyUI's ``res_multistep``."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_down == 0 or old_denoised is None or h_last is None:  # first and last steps: Euler
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            x = res_step(x, sigma, sigma_down, h_last, denoised, old_denoised)
        if noise is not None and sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        # h_last is the previous step's deterministic length t(sigma_down) - t(sigma), as in ComfyUI:
        # exactly how far back the previous evaluation lies for eta = 0, an approximation for eta > 0
        old_denoised, h_last = denoised, _t(sigma_down) - _t(sigma)
    return x


def sample_res_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """RES second-order multistep exponential integrator (Zhang et al. 2023; ComfyUI's res_multistep)."""
    return _res_multistep(denoiser, x, sigmas, cond, None, callback, eta=0.0, s_noise=0.0)


def sample_res_multistep_ancestral(
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
    """Ancestral RES multistep: RES steps down to sigma_down, fresh noise up to sigma_next."""
    noise_source = require_noise(noise, "res_multistep_ancestral") if eta > 0 else None
    return _res_multistep(denoiser, x, sigmas, cond, noise_source, callback, eta=eta, s_noise=s_noise)


def register(registry: Registry) -> None:
    """Register res_multistep and res_multistep_ancestral."""
    registry.add_sampler("res_multistep", sample_res_multistep, label="Res Multistep")
    registry.add_sampler(
        "res_multistep_ancestral",
        sample_res_multistep_ancestral,
        label="Res Multistep Ancestral",
        noise="gaussian",
    )


__all__ = ["register", "res_step", "sample_res_multistep", "sample_res_multistep_ancestral"]
