"""Improved PNDM: Adams-Bashforth on the probability-flow ODE in sigma.

iPNDM is the pseudo-numerical method of Liu et al. 2022 (PNDM) with its Runge-Kutta warm-up replaced by
lower-order Adams-Bashforth steps, as Zhang & Chen 2022 describe it ("Fast Sampling of Diffusion Models with
Exponential Integrator", https://arxiv.org/abs/2204.13902, appendix on iPNDM). With ``d = (x - x0) / sigma``
(which is the model's eps) each step is ``x_next = x + (sigma_next - sigma) * sum_j c_j * d_{i-j}``.

``ipndm`` uses the fixed weights of equal steps; ``ipndm_v`` the variable-step weights of zju-pi's
diff-sampler (``solvers.py``), exactly as ComfyUI's ``sample_ipndm_v`` computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, host_sigmas, report, to_d

Weights = Callable[[Sequence[float], int, int], tuple[float, ...]]
"""``(sigmas, i, order) -> (c_0, c_1, ...)``: weights of ``d_i, d_{i-1}, ...`` for the step ``i -> i + 1``."""

_ADAMS_BASHFORTH: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def _check_max_order(max_order: int, sampler: str) -> None:
    """Refuse a ``max_order`` outside 1..4, the orders these multistep samplers implement."""
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= 4:
        raise InvalidRequest(f"sampler {sampler!r}: max_order must be an integer from 1 to 4, got {max_order!r}")


def _fixed_step_weights(sigmas: Sequence[float], i: int, order: int) -> tuple[float, ...]:
    """Adams-Bashforth weights of order 1..4 for equal steps (iPNDM as Zhang & Chen 2022 define it)."""
    return _ADAMS_BASHFORTH[order - 1]


def _variable_step_weights(sigmas: Sequence[float], i: int, order: int) -> tuple[float, ...]:
    """Variable-step iPNDM weights as diff-sampler and ComfyUI compute them (equal to AB2 for order <= 2).

    With ``h = sigma_{i+1} - sigma_i`` and ``h1, h2, h3`` the previous steps, the weights add correction
    terms ``t1`` and ``t2`` to variable-step AB2. They follow the reference code literally; note that the
    reference's ``t1`` is ``(1 - h^2 / (3 h1 (h1 + h2))) / 2`` where exact AB3 would have
    ``h (2h + 3 h1) / (6 h1 (h1 + h2))``, and that at order 4 the weights sum to 1 only on equal steps.
    """
    h = sigmas[i + 1] - sigmas[i]
    if order == 1:
        return (1.0,)
    h1 = sigmas[i] - sigmas[i - 1]
    ab2 = (1 + h / (2 * h1), -h / (2 * h1))  # exact variable-step AB2
    if order == 2:
        return ab2
    h2 = sigmas[i - 1] - sigmas[i - 2]
    a = h1 / h2
    t1 = (1 - h * h / (3 * h1 * (h1 + h2))) / 2
    if order == 3:
        return (ab2[0] + t1, ab2[1] - (1 + a) * t1, a * t1)
    h3 = sigmas[i - 2] - sigmas[i - 3]
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    t2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) * (
        h * (h + h1) * (h + h1 + h2) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    )
    return (
        ab2[0] + t1 + t2,
        ab2[1] - (1 + a) * t1 - (1 + a + q) * t2,
        a * t1 + (a + q * (1 + h2 / h3)) * t2,
        -q * a * t2,
    )


def _sample_adams_bashforth(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    weights: Weights,
    max_order: int,
    cond: Conditioning | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Linear multistep in sigma: ``x_next = x + (sigma_next - sigma) * sum_j c_j d_{i-j}``."""
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    sigma_values = sigmas.tolist()
    ds: list[Tensor] = []  # newest first: d_i, d_{i-1}, ...
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        ds = [to_d(x, sigma, denoised), *ds][:max_order]
        if sigma_next == 0:  # ComfyUI's ipndm/ipndm_v land on the denoised estimate
            return denoised
        c = weights(sigma_values, i, len(ds))
        slope = c[0] * ds[0]
        for c_j, d_j in zip(c[1:], ds[1:], strict=True):
            slope = slope + c_j * d_j
        x = x + (sigma_next - sigma) * slope
    return x


def sample_ipndm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    max_order: int = 4,
) -> Tensor:
    """iPNDM (Zhang & Chen 2022): fixed Adams-Bashforth weights up to order ``max_order``."""
    _check_max_order(max_order, "ipndm")
    return _sample_adams_bashforth(denoiser, x, sigmas, _fixed_step_weights, max_order, cond, callback)


def sample_ipndm_v(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    max_order: int = 4,
) -> Tensor:
    """iPNDM with variable-step weights (Zhang & Chen 2022; diff-sampler's iPNDM_v)."""
    _check_max_order(max_order, "ipndm_v")
    return _sample_adams_bashforth(denoiser, x, sigmas, _variable_step_weights, max_order, cond, callback)


def register(registry: Registry) -> None:
    """Register ipndm and ipndm_v."""
    registry.add_sampler("ipndm", sample_ipndm, label="iPNDM")
    registry.add_sampler("ipndm_v", sample_ipndm_v, label="iPNDM v")


__all__ = ["register", "sample_ipndm", "sample_ipndm_v"]
