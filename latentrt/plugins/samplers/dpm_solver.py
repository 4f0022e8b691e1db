"""DPM-Solver fast and adaptive (Lu et al. 2022, https://arxiv.org/abs/2206.00927; k-diffusion's DPMSolver).

The solver works in ``t = -log(sigma)`` (the paper's half-log-SNR ``lambda`` for ``alpha = 1``) on the
noise prediction ``eps = (x - D(x, sigma)) / sigma``. Both samplers take only the endpoints of the
schedule, as ComfyUI adapts them to a sigma list: ``sigma_max = sigmas[0]`` and ``sigma_min`` the last
positive sigma; they return the latent at ``sigma_min`` (no final step onto 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import ancestral_step, append_dims, batch_sigma, like_x, report, require_noise


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


def _t(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


def _phi_1(h: Tensor) -> Tensor:
    """``(e^h - 1) / h``, continued by its limit 1 at ``h = 0``."""
    return torch.where(h == 0, torch.ones_like(h), h.expm1() / h)


def _sigma_range(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """``(sigma_min, sigma_max)``: the last positive sigma and the first one (ComfyUI's KSAMPLER)."""
    return (sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]), sigmas[0]


@dataclass(frozen=True)
class _Solver:
    """DPM-Solver-1, -2 and -3 single steps from ``t`` to ``t_next`` (scalars or per-image ``[batch]``)."""

    denoiser: Denoiser
    cond: Conditioning | None

    def eps(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Noise prediction at ``t`` and the denoised estimate it comes from."""
        sigma = _sigma(t)
        denoised = self.denoiser(x, batch_sigma(sigma, x), self.cond)
        return (x - denoised) / like_x(sigma, x), denoised

    def first(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor) -> Tensor:
        """DPM-Solver-1 (paper eq. 3.7): ``x - sigma_next (e^h - 1) eps``."""
        return x - like_x(_sigma(t_next) * (t_next - t).expm1(), x) * eps

    def second(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, r1: float = 0.5) -> tuple[Tensor, Tensor]:
        """DPM-Solver-2 (paper Algorithm 4 with ``r1``); also returns ``eps`` at the intermediate point."""
        h = t_next - t
        eps_r1 = self.eps(self.first(x, t, t + r1 * h, eps), t + r1 * h)[0]
        x_2 = self.first(x, t, t_next, eps) - like_x(_sigma(t_next) / (2 * r1) * h.expm1(), x) * (eps_r1 - eps)
        return x_2, eps_r1

    def third(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, eps_r1: Tensor | None = None) -> Tensor:
        """DPM-Solver-3 (paper Algorithm 5, ``r1 = 1/3``, ``r2 = 2/3``); reuses ``eps_r1`` when given."""
        r1, r2 = 1 / 3, 2 / 3
        h = t_next - t
        if eps_r1 is None:
            eps_r1 = self.eps(self.first(x, t, t + r1 * h, eps), t + r1 * h)[0]
        s2 = t + r2 * h
        u2 = self.first(x, t, s2, eps) - like_x(_sigma(s2) * (r2 / r1) * (_phi_1(r2 * h) - 1), x) * (eps_r1 - eps)
        eps_r2 = self.eps(u2, s2)[0]
        return self.first(x, t, t_next, eps) - like_x(_sigma(t_next) / r2 * (_phi_1(h) - 1), x) * (eps_r2 - eps)

    def step(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, order: int) -> Tensor:
        """One step of DPM-Solver-``order``."""
        if order == 1:
            return self.first(x, t, t_next, eps)
        if order == 2:
            return self.second(x, t, t_next, eps)[0]
        return self.third(x, t, t_next, eps)

    def embedded_pair(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, order: int) -> tuple[Tensor, Tensor]:
        """``(x_low, x_high)``: DPM-Solver-12 or -23 (paper section 4.2), sharing model evaluations."""
        if order == 2:
            return self.first(x, t, t_next, eps), self.second(x, t, t_next, eps)[0]
        x_low, eps_r1 = self.second(x, t, t_next, eps, r1=1 / 3)
        return x_low, self.third(x, t, t_next, eps, eps_r1)


def _ancestral_target(t: Tensor, t_next: Tensor, t_end: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Where the deterministic part of a step ``t -> t_next`` lands, and the noise std to add after it."""
    if not eta:
        return t_next, torch.zeros_like(t_next)
    sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_down = torch.minimum(t_end, _t(sigma_down))
    # clamped: rounding can put t_down a hair before t_next (k-diffusion gets NaN there)
    return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2).clamp(min=0) ** 0.5


def _single_step(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Conditioning | None, callback: SamplerCallback | None
) -> Tensor:
    """A one-step schedule ``[sigma, 0]`` leaves DPM-Solver no interval to solve (ComfyUI returns the
    input unchanged); take the first-order step to 0 instead, which lands on ``D(x, sigma)``."""
    denoised = denoiser(x, batch_sigma(sigmas[0], x), cond)
    report(callback, 0, x, sigmas[0], sigmas[1], denoised)
    return denoised


def fast_orders(nfe: int) -> list[int]:
    """Orders of DPM-Solver-fast's steps for ``nfe`` model evaluations (paper section 3.4): 3, ..., 3, then 2, 1."""
    steps = nfe // 3 + 1
    return [3] * (steps - 2) + [2, 1] if nfe % 3 == 0 else [3] * (steps - 1) + [nfe % 3]


def sample_dpm_fast(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-fast: ``len(sigmas) - 1`` model evaluations on steps uniform in log sigma (Lu et al. 2022)."""
    if len(sigmas) == 2:
        return _single_step(denoiser, x, sigmas, cond, callback)
    noise_source = require_noise(noise, "dpm_fast") if eta > 0 else None
    sigma_min, sigma_max = _sigma_range(sigmas)
    t_end = _t(sigma_min)
    orders = fast_orders(len(sigmas) - 1)
    ts = torch.linspace(float(_t(sigma_max)), float(t_end), len(orders) + 1, dtype=sigmas.dtype, device=sigmas.device)
    solver = _Solver(denoiser, cond)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_down, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps, denoised = solver.eps(x, t)
        report(callback, i, x, _sigma(t), _sigma(t_next), denoised)
        x = solver.step(x, t, t_down, eps, order)
        if noise_source is not None:
            x = x + noise_source(_sigma(t), _sigma(t_next)) * s_noise * sigma_up
    return x


@dataclass
class _PIDController:
    """PID step-size control in ``t``, one controller per image (k-diffusion's PIDStepSizeController).

    ``errs`` holds the inverse errors ``[current, previous, before]`` of each image, shape ``[3, batch]``.
    """

    h: Tensor
    b: tuple[float, float, float]
    accept_safety: float
    errs: Tensor | None = None
    eps: float = 1e-8

    @classmethod
    def create(cls, h: Tensor, order: float, pid: tuple[float, float, float], accept_safety: float) -> _PIDController:
        """Gains from ``(pcoeff, icoeff, dcoeff)`` scaled by the order of the error estimate."""
        p, i, d = pid
        return cls(h, ((p + i + d) / order, -(p + 2 * d) / order, d / order), accept_safety)

    def propose(self, error: Tensor, active: Tensor) -> Tensor:
        """Which active images accept their step; every active image's ``h`` is rescaled."""
        inv_error = 1 / (error.double() + self.eps)
        old = inv_error.expand(3, -1) if self.errs is None else self.errs
        errs = torch.stack([inv_error, old[1], old[2]])
        factor = errs[0] ** self.b[0] * errs[1] ** self.b[1] * errs[2] ** self.b[2]
        factor = 1 + torch.atan(factor - 1)  # limiter
        accept = active & (factor >= self.accept_safety)
        errs = torch.where(accept, torch.stack([errs[0], errs[0], errs[1]]), errs)
        self.errs = torch.where(active, errs, old)
        self.h = torch.where(active, self.h * factor, self.h)
        return accept


def _scaled_error(x_low: Tensor, x_high: Tensor, x_prev: Tensor, rtol: float, atol: float) -> Tensor:
    """Per-image RMS of ``(x_low - x_high) / max(atol, rtol * max(|x_low|, |x_prev|))`` (paper eq. 4.4)."""
    delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
    scaled = ((x_low - x_high) / delta).flatten(1)
    norm: Tensor = scaled.norm(dim=1)
    return norm / math.sqrt(scaled.shape[1])


def _check_adaptive_options(order: int, rtol: float, atol: float, h_init: float) -> None:
    """Refuse options with which the adaptive loop could never finish."""
    if order not in (2, 3):
        raise InvalidRequest(f"dpm_adaptive order must be 2 or 3, got {order}")
    if rtol < 0 or atol < 0 or rtol + atol <= 0:
        raise InvalidRequest(f"dpm_adaptive needs rtol, atol >= 0, not both 0; got rtol={rtol}, atol={atol}")
    if h_init == 0:
        raise InvalidRequest("dpm_adaptive needs a nonzero initial step h_init")


def sample_dpm_adaptive(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-12/23 with adaptive step size, controlled per image (Lu et al. 2022, section 4.2).

    Every image has its own step size (k-diffusion controls the whole batch at once), so an image of a
    batch matches the same image run alone. The callback is called at every attempt, rejected ones too,
    with the sigmas of the least advanced image.
    """
    _check_adaptive_options(order, rtol, atol, h_init)
    if len(sigmas) == 2:
        return _single_step(denoiser, x, sigmas, cond, callback)
    noise_source = require_noise(noise, "dpm_adaptive") if eta > 0 else None
    sigma_min, sigma_max = _sigma_range(sigmas)
    t_end = _t(sigma_min)
    s = _t(sigma_max) * x.new_ones([x.shape[0]], dtype=sigmas.dtype)  # each image's current t
    h = torch.full_like(s, abs(h_init), dtype=torch.float64)
    pid = _PIDController.create(h, 1.5 if eta else order, (pcoeff, icoeff, dcoeff), accept_safety)
    solver, x_prev, moved, i = _Solver(denoiser, cond), x, True, 0
    while bool((active := s < t_end - 1e-5).any()):
        t = torch.minimum(t_end, s + pid.h.to(s.dtype))
        t_down, sigma_up = _ancestral_target(s, t, t_end, eta)
        if not bool(torch.isfinite(pid.h).all()) or bool((pid.h[active] < 1e-12).any()):
            raise InvalidRequest(
                "dpm_adaptive: the step size collapsed (non-finite model output, or rtol/atol too tight)"
            )
        if moved:  # a rejected step retries from the same (x, s): its eps is still valid
            eps, denoised = solver.eps(x, s)
        x_low, x_high = solver.embedded_pair(x, s, t_down, eps, order)
        accept = pid.propose(_scaled_error(x_low, x_high, x_prev, rtol, atol), active)
        k = int(s.argmin())  # report the least advanced image's sigmas
        report(callback, i, x, _sigma(s[k]), _sigma(t[k]), denoised)
        if noise_source is not None:  # drawn at every attempt, so image k's noise never depends on the others
            x_high = x_high + noise_source(_sigma(s), _sigma(t)) * s_noise * like_x(sigma_up, x)
        accepted = append_dims(accept, x.ndim)
        x_prev, x = torch.where(accepted, x_low, x_prev), torch.where(accepted, x_high, x)
        s, moved, i = torch.where(accept, t, s), bool(accept.any()), i + 1
    return x


def register(registry: Registry) -> None:
    """Register dpm_fast and dpm_adaptive.

    Both default to eta = 0 (deterministic, as ComfyUI) but draw Gaussian noise when a
    user sets eta > 0, so the pipeline hands them a Gaussian noise source.
    """
    registry.add_sampler("dpm_fast", sample_dpm_fast, label="DPM fast", aliases=("k_dpm_fast",), noise="gaussian")
    registry.add_sampler(
        "dpm_adaptive", sample_dpm_adaptive, label="DPM adaptive", aliases=("k_dpm_ad",), noise="gaussian"
    )


__all__ = ["fast_orders", "register", "sample_dpm_adaptive", "sample_dpm_fast"]
