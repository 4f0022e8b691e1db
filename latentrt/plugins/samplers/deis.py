"""DEIS (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator",
https://arxiv.org/abs/2204.13902), the time-polynomial "tAB" variant ComfyUI runs as ``deis``.

In VE coordinates the exponential integrator is plain: ``dx/dsigma = eps``, so a step is
``x_next = x + integral of eps dsigma``. tAB-DEIS extrapolates eps with the Lagrange polynomial through
the last ``order`` evaluations, taken in the time ``t`` of a linear VP-SDE, which gives the weights

    C_ij = integral_{t_i}^{t_{i+1}} (dsigma/dt) * l_j(t) dt = integral_{sigma_i}^{sigma_{i+1}} l_j(t(sigma)) dsigma

of ``d_i, d_{i-1}, ...`` (``l_j`` is the Lagrange basis on ``t_i, t_{i-1}, ...``). Like ComfyUI and zju-pi's
diff-sampler, the VP-SDE is the one fitted to EDM's range (``sigma(1e-3) = 0.002``, ``sigma(1) = 80``)
whatever the model. We integrate in sigma with Gauss-Legendre quadrature, where the integrand is smooth;
ComfyUI sums 10000 points in ``t``, which agrees to about 1e-6 relative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, report, to_d

_EPSILON_S, _SIGMA_MIN, _SIGMA_MAX = 1e-3, 0.002, 80.0
"""The VP-SDE's time range and EDM's noise range it is fitted to."""

_QUADRATURE_NODES = 16
"""Gauss-Legendre nodes per step: the integrand is analytic in sigma, so 16 nodes reach float64 accuracy."""

FloatArray = npt.NDArray[np.float64]


def vp_time(sigma: FloatArray) -> FloatArray:
    """Time ``t`` at which the fitted linear VP-SDE has noise level ``sigma``.

    That SDE has ``log(1 + sigma(t)^2) = beta_d t^2 / 2 + beta_min t`` (Song et al. 2021, "Score-Based
    Generative Modeling through SDEs", https://arxiv.org/abs/2011.13456, VP-SDE with linear beta).
    """
    log_lo, log_hi = math.log1p(_SIGMA_MIN**2), math.log1p(_SIGMA_MAX**2)
    beta_d = 2 * (log_lo / _EPSILON_S - log_hi) / (_EPSILON_S - 1)
    beta_min = log_hi - beta_d / 2
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(sigma**2)) - beta_min) / beta_d


def _lagrange_basis(t: FloatArray, knots: FloatArray, j: int) -> FloatArray:
    """``l_j(t) = prod_{k != j} (t - knots_k) / (knots_j - knots_k)``."""
    basis = np.ones_like(t)
    for k, knot in enumerate(knots):
        if k != j:
            basis = basis * (t - knot) / (knots[j] - knot)
    return basis


def deis_coefficients(sigmas: Sequence[float], max_order: int) -> list[tuple[float, ...]]:
    """tAB-DEIS weights ``C_ij`` of ``d_i, d_{i-1}, ...`` for every step ``sigma_i -> sigma_{i+1}``.

    Step ``i`` uses ``min(max_order, i + 1)`` evaluations; a step to ``sigma = 0`` is an Euler step, as in
    ComfyUI.
    """
    sigma = np.asarray(sigmas, dtype=np.float64)
    knots_all = vp_time(sigma)
    nodes, weights = np.polynomial.legendre.leggauss(_QUADRATURE_NODES)
    coefficients: list[tuple[float, ...]] = []
    for i in range(len(sigma) - 1):
        lo, hi = float(sigma[i]), float(sigma[i + 1])
        order = min(max_order, i + 1) if hi > 0 else 1
        if order == 1:
            coefficients.append((hi - lo,))
            continue
        t = vp_time((lo + hi) / 2 + (hi - lo) / 2 * nodes)  # quadrature nodes mapped onto [lo, hi]
        knots = knots_all[i - np.arange(order)]  # t_i, t_{i-1}, ...
        row = ((hi - lo) / 2 * float(weights @ _lagrange_basis(t, knots, j)) for j in range(order))
        coefficients.append(tuple(row))
    return coefficients


def sample_deis(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    max_order: int = 3,
) -> Tensor:
    """DEIS (Zhang & Chen 2022): tAB exponential-integrator multistep of order up to ``max_order``."""
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= 4:
        raise InvalidRequest(f"sampler 'deis': max_order must be an integer from 1 to 4, got {max_order!r}")
    coefficients = deis_coefficients(sigmas.tolist(), max_order)
    ds: list[Tensor] = []  # newest first: d_i, d_{i-1}, ...
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        ds = [to_d(x, sigma, denoised), *ds][:max_order]
        for c_j, d_j in zip(coefficients[i], ds, strict=False):  # x_next = x + sum_j C_ij d_{i-j}
            x = x + c_j * d_j
    return x


def register(registry: Registry) -> None:
    """Register deis."""
    registry.add_sampler("deis", sample_deis, label="DEIS")


__all__ = ["deis_coefficients", "register", "sample_deis", "vp_time"]
