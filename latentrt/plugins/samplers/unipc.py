"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", https://arxiv.org/abs/2302.04867): data-prediction multistep with the B(h) variants.

In VE coordinates ``alpha = 1`` and ``lambda = -log sigma``, so with ``h = lambda_next - lambda =
log(sigma / sigma_next)`` the first-order part of every update is the DDIM step
``x0 + (sigma_next / sigma) * (x - x0)``. UniP-p (predictor) and UniC-p (corrector) add
``-B(h) * sum_k rho_k D_k`` with ``D_k = (x0_k - x0) / r_k`` and ``r_k = (lambda_k - lambda) / h``; ``rho``
solves the order conditions ``sum_k rho_k r_k^(m-1) = m! * hh * phi_{m+1}(hh) / B(h)``, ``hh = -h``, with
``B(h) = hh`` ("bh1") or ``expm1(hh)`` ("bh2"). A single node takes ``rho = 1/2``, as in the authors' code.

The last step lands exactly on sigma = 0, as diffusers' UniPCMultistepScheduler does;
ComfyUI's sample_unipc ends at 0.001 instead, leaving about 1e-3 of noise in the latent.

Schedule of orders as in ComfyUI (and diffusers with ``lower_order_final``): step ``k`` of ``n`` (1-based)
has order ``min(3, k, n + 1 - k)``; the corrector runs after every step but the last and reuses the model
evaluation at the predicted point for the next step, so the sampler costs one evaluation per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from torch import Tensor

from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, report

Variant = Literal["bh1", "bh2"]
History = Sequence[tuple[float, Tensor]]
"""``(sigma, x0)`` of earlier model evaluations, newest first."""

MAX_ORDER = 3


def _order_conditions(h: float, n: int, variant: Variant) -> tuple[float, list[float]]:
    """``B(h)`` and the right-hand sides ``m! * hh * phi_{m+1}(hh) / B(h)`` for ``m = 1..n``."""
    hh = -h  # the data-prediction form is written in -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    g = (
        math.expm1(hh) / hh - 1
    )  # g_m = hh * phi_{m+1}(hh), from g_1 = phi_1(hh) - 1 and g_{m+1} = g_m / hh - 1 / (m+1)!
    factorial, rhs = 1, []
    for m in range(1, n + 1):
        rhs.append(g * factorial / b_h)
        factorial *= m + 1
        g = g / hh - 1 / factorial
    return b_h, rhs


def _rhos(rks: Sequence[float], rhs: Sequence[float]) -> list[float]:
    """Solve ``sum_k rho_k r_k^(m-1) = rhs_m``; one node takes ``rho = 1/2`` (the small-h limit)."""
    if len(rks) == 1:
        return [0.5]
    vandermonde = np.vander(np.asarray(rks, dtype=np.float64), increasing=True).T
    return [float(rho) for rho in np.linalg.solve(vandermonde, np.asarray(rhs, dtype=np.float64))]


def unipc_update(
    x: Tensor, history: History, sigma_next: float, variant: Variant, x0_next: Tensor | None = None
) -> Tensor:
    """One UniPC update from ``history[0]``'s sigma to ``sigma_next``.

    The predictor UniP-p uses ``p = len(history)`` evaluations; given ``x0_next`` (the model at the predicted
    point) it is the corrector UniC-p, which adds that evaluation as the node ``r = 1``.
    """
    sigma, x0 = history[0]
    ratio = sigma_next / sigma
    x_ddim = ratio * x + (1 - ratio) * x0  # (sigma_next / sigma) * x - expm1(-h) * x0
    if len(history) == 1 and x0_next is None:
        return x_ddim
    h = math.log(sigma / sigma_next)
    rks = [math.log(sigma / sigma_k) / h for sigma_k, _ in history[1:]]
    ds = [(x0_k - x0) / r_k for (_, x0_k), r_k in zip(history[1:], rks, strict=True)]
    if x0_next is not None:
        rks.append(1.0)
        ds.append(x0_next - x0)
    b_h, rhs = _order_conditions(h, len(rks), variant)
    residual = ds[0] * 0
    for rho, d in zip(_rhos(rks, rhs), ds, strict=True):
        residual = residual + rho * d
    return x_ddim - b_h * residual


def _sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Conditioning | None,
    callback: SamplerCallback | None,
    variant: Variant,
) -> Tensor:
    """Multistep UniPC: UniP-p steps, each followed by UniC-p except the last (Zhao et al. 2023)."""
    values = sigmas.tolist()
    steps = len(values) - 1
    history: list[tuple[float, Tensor]] = []
    x_last, order = x, 1
    for i in range(steps):
        denoised = denoiser(x, batch_sigma(sigmas[i], x), cond)
        if history:  # UniC: correct x_i with the model's value at the predicted x_i
            x = unipc_update(x_last, history[:order], values[i], variant, x0_next=denoised)
        history = [(values[i], denoised), *history][:MAX_ORDER]
        report(callback, i, x, sigmas[i], sigmas[i + 1], denoised)
        order = min(MAX_ORDER, i + 1, steps - i)  # warm-up, and lower orders for the final steps
        x_last = x
        x = unipc_update(x, history[:order], values[i + 1], variant)  # UniP
    return x


def sample_uni_pc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """UniPC (Zhao et al. 2023), order 3 predictor-corrector with ``B(h) = h`` (bh1)."""
    return _sample_unipc(denoiser, x, sigmas, cond, callback, "bh1")


def sample_uni_pc_bh2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """UniPC (Zhao et al. 2023), order 3 predictor-corrector with ``B(h) = e^h - 1`` (bh2)."""
    return _sample_unipc(denoiser, x, sigmas, cond, callback, "bh2")


def register(registry: Registry) -> None:
    """Register uni_pc and uni_pc_bh2 (both run on schedules with the penultimate sigma dropped)."""
    registry.add_sampler("uni_pc", sample_uni_pc, label="UniPC", discard_penultimate_sigma=True)
    registry.add_sampler("uni_pc_bh2", sample_uni_pc_bh2, label="UniPC BH2", discard_penultimate_sigma=True)


__all__ = ["register", "sample_uni_pc", "sample_uni_pc_bh2", "unipc_update"]
