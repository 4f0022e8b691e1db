"""Small building blocks that samplers share, built-in and third-party alike.

Formulas follow k-diffusion (``k_diffusion/sampling.py``) and Karras et al. 2022
(https://arxiv.org/abs/2206.00364): the probability-flow ODE in sigma is
``dx/dsigma = (x - D(x, sigma)) / sigma`` (their eq. 3 with ``sigma(t) = t``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import NoiseSource, SamplerCallback, StepInfo

__all__ = [
    "ancestral_step",
    "churn",
    "karras_levels",
    "like_x",
    "append_dims",
    "batch_sigma",
    "check_options",
    "check_sigmas",
    "host_sigmas",
    "report",
    "require_noise",
    "sampler_options",
    "sampler_signature_problem",
    "to_d",
]


def append_dims(t: Tensor, target_dims: int) -> Tensor:
    """Append trailing singleton dims so ``t`` broadcasts against a ``target_dims``-D tensor."""
    missing = target_dims - t.ndim
    if missing < 0:
        raise ValueError(f"tensor has {t.ndim} dims, more than the target {target_dims}")
    return t[(...,) + (None,) * missing]


def batch_sigma(sigma: Tensor, x: Tensor) -> Tensor:
    """A scalar sigma as the ``[batch]`` tensor the denoiser contract asks for, on ``x``'s device.

    Kept in at least float32 even for fp16/bf16 latents: bf16 would round sigma 14.6146 to
    14.625 before the model turns it into a timestep.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if _host_scalar_for(sigma, x):  # a fill kernel; copying the host value over would sync the device
        return torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)
    return sigma.to(device=x.device, dtype=dtype).expand(x.shape[0]).contiguous()


def like_x(value: Tensor, x: Tensor) -> Tensor:
    """A sigma-derived coefficient in ``x``'s dtype and device, shaped to broadcast against it.

    Samplers multiply latents by coefficients computed from ``sigmas``, which may be float32
    on the CPU while ``x`` is fp16 on a GPU: converting first keeps the latent's dtype and
    avoids a device mismatch. A host scalar is filled in on ``x``'s device rather than copied there:
    a blocking host-to-device copy would make the host wait for the GPU at every step.
    """
    if _host_scalar_for(value, x):
        return torch.full((1,) * x.ndim, float(value), dtype=x.dtype, device=x.device)
    return append_dims(value.to(device=x.device, dtype=x.dtype), x.ndim)


def _host_scalar_for(value: Tensor, x: Tensor) -> bool:
    """Whether ``value`` is one number on the host while ``x`` lives on an accelerator."""
    return value.numel() == 1 and value.device.type == "cpu" and x.device.type != "cpu"


def host_sigmas(sigmas: Tensor) -> Tensor:
    """``sigmas`` on the host, read once before a sampling loop (one sync when they live on a GPU).

    Samplers branch on sigma values (``if sigma_next == 0``) and do their scalar arithmetic on them:
    on the host that never waits for the GPU, and CUDA kernels take 0-dim host tensors as plain
    scalars, so the loop only queues kernels. Latents, noise and model calls stay on their device.
    """
    return sigmas.detach().to("cpu")


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Karras ODE derivative ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
    return (x - denoised) / like_x(sigma, x)


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split an ancestral step into a deterministic part and fresh noise.

    Returns ``(sigma_down, sigma_up)`` with ``sigma_down^2 + sigma_up^2 = sigma_to^2``;
    ``eta = 0`` gives the deterministic step (``sigma_up = 0``).
    """
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def require_noise(noise: NoiseSource | None, sampler: str) -> NoiseSource:
    """Return ``noise``, or explain that the stochastic sampler ``sampler`` needs one."""
    if noise is None:
        raise InvalidRequest(
            f"sampler {sampler!r} injects noise and needs a noise source: pass noise=... "
            "(latentrt.core.noise.GaussianNoise or BrownianTreeNoise), or turn the noise off "
            "(eta=0 or s_churn=0, where the sampler has them)"
        )
    return noise


def report(
    callback: SamplerCallback | None, i: int, x: Tensor, sigma: Tensor, sigma_next: Tensor, denoised: Tensor
) -> None:
    """Send one :class:`StepInfo` to ``callback`` when there is one."""
    if callback is not None:
        callback(StepInfo(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))


def check_sigmas(sigmas: Tensor) -> None:
    """Refuse sigmas that are not a finite, strictly decreasing 1-D run ending in 0."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise InvalidRequest("sigmas must be a 1-D tensor of at least 2 noise levels ending in 0")
    values = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise InvalidRequest(f"sigmas must be finite and >= 0, got {_preview(values)}")
    if float(values[-1]) != 0.0:
        raise InvalidRequest(f"sigmas must end with 0, got last value {float(values[-1])}")
    if not bool((values[1:] < values[:-1]).all()):
        raise InvalidRequest(f"sigmas must be strictly decreasing, got {_preview(values)}")


def _preview(values: Tensor, limit: int = 8) -> str:
    shown = ", ".join(f"{float(v):.4g}" for v in values[:limit])
    return f"[{shown}{', ...' if values.numel() > limit else ''}]"


def sampler_signature_problem(fn: Callable[..., Any]) -> str | None:
    """Why ``fn`` cannot be called as ``fn(denoiser, x, sigmas, cond=, noise=, callback=)``, or None."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return "its signature cannot be inspected"
    try:
        signature.bind(None, None, None, cond=None, noise=None, callback=None)
    except TypeError as exc:
        return f"it cannot be called as fn(denoiser, x, sigmas, *, cond, noise, callback): {exc}"
    return None


_CONTRACT_PARAMETERS = frozenset({"denoiser", "x", "sigmas", "cond", "noise", "callback"})


def sampler_options(fn: Callable[..., Any]) -> dict[str, Any]:
    """A sampler's options (keyword parameters beyond the contract) with their defaults."""
    options: dict[str, Any] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name in _CONTRACT_PARAMETERS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        options[name] = None if param.default is inspect.Parameter.empty else param.default
    return options


def check_options(fn: Callable[..., Any], name: str, options: dict[str, Any]) -> None:
    """Refuse options a sampler does not take, naming the ones it does."""
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    known = sampler_options(fn)
    unknown = sorted(set(options) - set(known))
    if unknown and not accepts_any:
        valid = ", ".join(sorted(known)) or "none"
        raise InvalidRequest(f"sampler {name!r} does not take option(s) {', '.join(unknown)}; it takes: {valid}")


def churn(
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    steps: int,
    noise: NoiseSource | None,
    sampler: str,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> tuple[Tensor, Tensor]:
    """Karras Algorithm 2 lines 4-6: raise ``sigma`` to ``sigma_hat = (1 + gamma) sigma`` with fresh noise.

    Returns ``(x_hat, sigma_hat)``; noise is drawn only when ``gamma > 0``.
    """
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        eps = require_noise(noise, sampler)(sigma, sigma_next) * s_noise
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def karras_levels(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``steps`` float64 noise levels from ``sigma_max`` to ``sigma_min``, evenly spaced in
    ``sigma^(1/rho)`` (Karras et al. 2022, eq. 5), without the final 0.

    The one Karras formula in latentrt: the ``karras`` schedule, the restart sampler
    and the conformance kit all build on it.
    """
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    levels: Tensor = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return levels
