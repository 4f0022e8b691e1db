"""Linear multistep (Adams-Bashforth on non-uniform sigmas; k-diffusion's sample_lms)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, report, to_d


def _times_linear(poly: list[float], root: float) -> list[float]:
    """Coefficients (lowest degree first) of ``poly(u) * (u - root)``."""
    shifted = [0.0, *poly]
    scaled = [-root * c for c in poly] + [0.0]
    return [a + b for a, b in zip(shifted, scaled, strict=True)]


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Weights of the ``order`` latest slopes for the step ``sigmas[i] -> sigmas[i + 1]``.

    Weight ``j`` (slope at ``sigmas[i - j]``) is the integral over the step of the Lagrange basis
    polynomial ``l_j`` on the nodes ``sigmas[i], ..., sigmas[i - order + 1]``; the polynomial is built
    exactly in ``u = sigma - sigmas[i]`` and integrated term by term (k-diffusion uses numerical
    quadrature for the same integral).
    """
    if not 1 <= order <= i + 1:
        raise InvalidRequest(f"LMS order {order} needs {order} previous slopes, step {i} has {i + 1}")
    nodes = [sigmas[i - j] - sigmas[i] for j in range(order)]
    h = sigmas[i + 1] - sigmas[i]
    weights = []
    for j, node_j in enumerate(nodes):
        poly, scale = [1.0], 1.0
        for k, node_k in enumerate(nodes):
            if k != j:  # l_j(u) = prod_{k != j} (u - u_k) / (u_j - u_k)
                poly, scale = _times_linear(poly, node_k), scale * (node_j - node_k)
        integral = sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly))
        weights.append(integral / scale)
    return weights


def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep: integrate the Lagrange interpolant of the last ``order`` slopes (k-diffusion)."""
    if order < 1:
        raise InvalidRequest(f"LMS order must be at least 1, got {order}")
    sigma_values = sigmas.detach().cpu().double().tolist()
    slopes: deque[Tensor] = deque(maxlen=order)  # newest last
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        slopes.append(to_d(x, sigma, denoised))
        report(callback, i, x, sigma, sigmas[i + 1], denoised)
        weights = lms_coefficients(sigma_values, i, len(slopes))
        # like k-diffusion, the step onto sigma = 0 is an LMS step too (ComfyUI takes x = denoised there)
        x = x + sum((w * d for w, d in zip(weights, reversed(slopes), strict=True)), start=torch.zeros_like(x))
    return x


def register(registry: Registry) -> None:
    """Register lms."""
    registry.add_sampler("lms", sample_lms, label="LMS", aliases=("k_lms",))


__all__ = ["lms_coefficients", "register", "sample_lms"]
