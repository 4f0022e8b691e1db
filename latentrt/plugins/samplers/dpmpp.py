"""DPM-Solver++ samplers (Lu et al. 2022, https://arxiv.org/abs/2211.01095; k-diffusion).

All work in the data-prediction form with the time variable ``t = -log(sigma)`` (the
paper's ``lambda``, half log-SNR, for ``alpha = 1``). One first-order step from ``t`` to
``t_next = t + h`` (DPM-Solver++(1), i.e. DDIM) is
``x_next = (sigma_next / sigma) * x - expm1(-h) * D(x, sigma)``;
the higher-order solvers replace ``D`` by a corrected estimate. The SDE variants follow
k-diffusion's ``sample_dpmpp_*_sde`` and take Brownian-tree increments as their noise.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import ancestral_step, batch_sigma, host_sigmas, report, require_noise, to_d

SolverType = Literal["midpoint", "heun"]


def _t(sigma: Tensor) -> Tensor:
    """DPM-Solver time ``t = -log(sigma)``."""
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    """Inverse of :func:`_t`: ``sigma = exp(-t)``."""
    return t.neg().exp()


def sample_dpmpp_2s_ancestral(
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
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, Algorithm 1, r = 1/2)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    noise_source = require_noise(noise, "dpmpp_2s_ancestral") if eta > 0 else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_down == 0:  # last step: Euler straight to the denoised estimate
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:  # DPM-Solver++(2S) from sigma to sigma_down, midpoint s in t
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - (-0.5 * h).expm1() * denoised
            denoised_2 = denoiser(x_2, batch_sigma(_sigma(s), x), cond)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if noise_source is not None and sigma_next > 0:
            x = x + noise_source(sigma, sigma_next) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """Stochastic DPM-Solver++ (2-stage, intermediate point at ``t + r h``; k-diffusion's dpmpp_sde)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    noise_source = require_noise(noise, "dpmpp_sde") if eta > 0 else None
    fac = 1 / (2 * r)  # weight of the second evaluation, DPM-Solver-2 with general r (Lu et al. 2022)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:  # last step: Euler straight to the denoised estimate
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = _t(sigma), _t(sigma_next)
        sigma_s = _sigma(t + r * (t_next - t))
        # stage 1: ancestral first-order step sigma -> sigma_s, evaluate there
        x_2 = _ancestral_dpm_step(x, sigma, sigma_s, denoised, eta, s_noise, noise_source)
        denoised_2 = denoiser(x_2, batch_sigma(sigma_s, x), cond)
        # stage 2: the full step with the combined estimate
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = _ancestral_dpm_step(x, sigma, sigma_next, denoised_d, eta, s_noise, noise_source)
    return x


def _ancestral_dpm_step(
    x: Tensor,
    sigma: Tensor,
    sigma_to: Tensor,
    denoised: Tensor,
    eta: float,
    s_noise: float,
    noise_source: NoiseSource | None,
) -> Tensor:
    """First-order DPM-Solver++ step to ``sigma_down``, then noise back up to ``sigma_to``."""
    sigma_down, sigma_up = ancestral_step(sigma, sigma_to, eta)
    t, t_down = _t(sigma), _t(sigma_down)
    x = (_sigma(t_down) / _sigma(t)) * x - (t - t_down).expm1() * denoised
    if noise_source is not None:
        x = x + noise_source(sigma, sigma_to) * s_noise * sigma_up
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), the second-order multistep solver (Lu et al. 2022, Algorithm 2)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    old_denoised: Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        if old_denoised is None or sigma_next == 0:
            denoised_d = denoised  # first and last steps: first order
        else:  # linear extrapolation of D over the previous step, r = h_last / h
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: SolverType = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++(2M), with k-diffusion's eta)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    if solver_type not in ("midpoint", "heun"):
        raise InvalidRequest(f"dpmpp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise_source = require_noise(noise, "dpmpp_2m_sde") if eta > 0 else None
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:  # last step: the denoised estimate itself
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        eta_h = eta * h
        one_minus = (-h - eta_h).expm1().neg()  # 1 - exp(-(1 + eta) h)
        x = (sigma_next / sigma) * (-eta_h).exp() * x + one_minus * denoised
        if old_denoised is not None and h_last is not None:  # second-order correction, r = h_last / h
            r = h_last / h
            if solver_type == "heun":
                x = x + (one_minus / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                x = x + 0.5 * one_minus * (1 / r) * (denoised - old_denoised)
        if noise_source is not None:
            x = x + noise_source(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_2m_sde_heun(
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
    """DPM-Solver++(2M) SDE with the Heun-type correction (ComfyUI's dpmpp_2m_sde_heun)."""
    if eta > 0:
        require_noise(noise, "dpmpp_2m_sde_heun")
    return sample_dpmpp_2m_sde(
        denoiser, x, sigmas, cond=cond, noise=noise, callback=callback, eta=eta, s_noise=s_noise, solver_type="heun"
    )


def sample_dpmpp_3m_sde(
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
    """DPM-Solver++(3M) SDE: third-order multistep with k-diffusion's eta (Lu et al. 2022)."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    noise_source = require_noise(noise, "dpmpp_3m_sde") if eta > 0 else None
    history: list[tuple[Tensor, Tensor]] = []  # (denoised, h) of the previous steps, newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:  # last step: the denoised estimate itself
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        h_eta = h * (eta + 1)
        x = (-h_eta).exp() * x + (-h_eta).expm1().neg() * denoised
        x = x + _multistep_correction(denoised, h, h_eta, history)
        if noise_source is not None:
            x = x + noise_source(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        history = [(denoised, h), *history[:1]]
    return x


def _multistep_correction(denoised: Tensor, h: Tensor, h_eta: Tensor, history: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The 3M SDE's phi_2 / phi_3 terms from up to two previous (denoised, h) pairs."""
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    if len(history) >= 2:  # divided differences of D over the last three points
        (denoised_1, h_1), (denoised_2, h_2) = history[0], history[1]
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        return phi_2 * d1 - phi_3 * d2
    if history:
        denoised_1, h_1 = history[0]
        return phi_2 * (denoised - denoised_1) / (h_1 / h)
    return denoised.new_zeros(())


def register(registry: Registry) -> None:
    """Register the DPM-Solver++ family."""
    registry.add_sampler(
        "dpmpp_2s_ancestral",
        sample_dpmpp_2s_ancestral,
        label="DPM++ 2S a",
        aliases=("k_dpmpp_2s_a",),
        noise="gaussian",
    )
    registry.add_sampler("dpmpp_sde", sample_dpmpp_sde, label="DPM++ SDE", aliases=("k_dpmpp_sde",), noise="brownian")
    registry.add_sampler("dpmpp_2m", sample_dpmpp_2m, label="DPM++ 2M", aliases=("k_dpmpp_2m",))
    registry.add_sampler(
        "dpmpp_2m_sde", sample_dpmpp_2m_sde, label="DPM++ 2M SDE", aliases=("k_dpmpp_2m_sde",), noise="brownian"
    )
    registry.add_sampler("dpmpp_2m_sde_heun", sample_dpmpp_2m_sde_heun, label="DPM++ 2M SDE Heun", noise="brownian")
    registry.add_sampler(
        "dpmpp_3m_sde", sample_dpmpp_3m_sde, label="DPM++ 3M SDE", aliases=("k_dpmpp_3m_sde",), noise="brownian"
    )


__all__ = [
    "register",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
]
