"""Conformance checks for sampler plugins, and the analytic target they run on.

Third-party sampler authors run these on their own plugins::

    from latentrt.testing import check_sampler
    check_sampler(my_sampler_fn)            # or a registered name: check_sampler("my_sampler")

or, with pytest, use the ``latentrt_check_sampler`` fixture this module provides as a
pytest plugin (installed automatically through the ``pytest11`` entry point).

The analytic target: data ``x0 ~ N(mu, s^2)`` per element. Its exact denoiser is
``D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)``, the marginal at ``sigma`` is
``N(mu, s^2 + sigma^2)``, and the probability-flow ODE has the closed-form solution
``x(sigma_b) - mu = (x(sigma_a) - mu) * sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.noise import noise_for_sampler
from latentrt.core.protocols import Conditioning, ModelSampling
from latentrt.core.registry import SamplerSpec, registry
from latentrt.core.sampling import karras_levels

__all__ = [
    "GaussianConsistencyFunction",
    "GaussianDenoiser",
    "GaussianTarget",
    "check_sampler",
    "convergence_order",
    "run_sampler",
]


@dataclass
class GaussianDenoiser:
    """The exact denoiser of ``N(mu, s^2)`` data; counts its calls."""

    mu: float
    s: float
    model_sampling: ModelSampling = field(default_factory=sd_model_sampling)
    calls: int = 0

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
        """``D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)``, sigma of shape [batch]."""
        self.calls += 1
        if sigma.shape != (x.shape[0],):
            raise AssertionError(f"denoiser contract: sigma must have shape [batch], got {tuple(sigma.shape)}")
        sigma2 = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) ** 2
        return (self.s**2 * x + sigma2 * self.mu) / (self.s**2 + sigma2)


@dataclass(frozen=True)
class GaussianTarget:
    """Data ``N(mu, s^2)``: its exact denoiser, marginals and ODE solution."""

    mu: float = 0.5
    s: float = 0.6

    def denoiser(self, model_sampling: ModelSampling | None = None) -> GaussianDenoiser:
        """A fresh exact denoiser."""
        return GaussianDenoiser(self.mu, self.s, model_sampling or sd_model_sampling())

    def consistency_function(self, model_sampling: ModelSampling | None = None) -> GaussianConsistencyFunction:
        """The exact consistency function ``f(x, sigma) = x(0)`` along the ODE (Song et al. 2023)."""
        return GaussianConsistencyFunction(self, model_sampling or sd_model_sampling())

    def start(self, shape: Sequence[int], sigma: float, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
        """Samples of the exact marginal ``N(mu, s^2 + sigma^2)`` at noise level ``sigma``."""
        z = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (self.mu + math.sqrt(self.s**2 + sigma**2) * z).to(dtype)

    def ode_solution(self, x: Tensor, sigma_from: float, sigma_to: float = 0.0) -> Tensor:
        """Where the probability-flow ODE carries ``x`` from ``sigma_from`` to ``sigma_to``."""
        ratio = math.sqrt(self.s**2 + sigma_to**2) / math.sqrt(self.s**2 + sigma_from**2)
        return self.mu + (x - self.mu) * ratio


@dataclass
class GaussianConsistencyFunction:
    """What a perfect consistency model (LCM) returns on the Gaussian target: the ODE end point.

    Consistency samplers such as ``lcm`` jump to ``x0`` and re-noise; with the MMSE
    denoiser instead of a consistency model they shrink the spread at every jump.
    """

    target: GaussianTarget
    model_sampling: ModelSampling

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
        """``mu + (x - mu) * s / sqrt(s^2 + sigma^2)``, per image."""
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return self.target.mu + (x - self.target.mu) * self.target.s / (self.target.s**2 + sigma_b**2) ** 0.5


def _resolve(sampler: SamplerSpec | Callable[..., Tensor] | str) -> SamplerSpec:
    if isinstance(sampler, SamplerSpec):
        return sampler
    if isinstance(sampler, str):
        return registry().sampler(sampler)
    name = getattr(sampler, "__name__", "sampler")
    return SamplerSpec(name=name, fn=sampler, label=name, aliases=(), plugin="<under test>", noise="gaussian")


def _karras(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    levels = karras_levels(steps, sigma_min, sigma_max)
    return torch.cat([levels, levels.new_zeros(1)])


def run_sampler(
    spec: SamplerSpec,
    target: GaussianTarget,
    sigmas: Tensor,
    *,
    batch: int = 4,
    shape: Sequence[int] = (1, 8, 8),
    seeds: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float64,
    **options: Any,
) -> Tensor:
    """Sample the Gaussian target from its exact marginal at ``sigmas[0]``, one seed per image."""
    seeds = list(range(batch)) if seeds is None else list(seeds)
    x = torch.cat([target.start((1, *shape), float(sigmas[0]), seed=s, dtype=dtype) for s in seeds])
    sigmas = sigmas.to(dtype)
    noise = noise_for_sampler(spec.noise, x, sigmas, [1000 + s for s in seeds])
    return spec.sample(target.denoiser(), x, sigmas, noise=noise, **options)


def convergence_order(
    sampler: SamplerSpec | Callable[..., Tensor] | str,
    steps: Sequence[int] = (8, 16, 32, 64),
    target: GaussianTarget | None = None,
    sigma_range: tuple[float, float] = (0.1, 10.0),
    **options: Any,
) -> float:
    """Observed order of a deterministic sampler: minus the slope of log(error) vs log(steps).

    The sampler integrates the ODE from ``sigma_max`` down to ``sigma_min`` (not to 0:
    every sampler takes its last step to 0 as a plain first-order step whose error does
    not shrink with the step count) along Karras schedules of ``n`` steps; the error is
    the max abs difference from the exact solution.

    The Gaussian target's ODE is linear, so some methods show a higher order here than
    in general (the explicit midpoint method's h^3 error term vanishes on it and it
    measures ~3): read the result as "at least this order on linear problems".
    """
    spec, target = _resolve(sampler), target or GaussianTarget()
    sigma_min, sigma_max = sigma_range
    errors = []
    for n in steps:
        sigmas = _karras(n, sigma_min, sigma_max)[:-1]
        x_t = target.start((4, 1, 8, 8), sigma_max, seed=7)
        result = spec.fn(target.denoiser(), x_t.clone(), sigmas, **options)
        errors.append(float((result - target.ode_solution(x_t, sigma_max, sigma_min)).abs().max()))
    logs = [(math.log(n), math.log(max(e, 1e-300))) for n, e in zip(steps, errors, strict=True)]
    mean_n = sum(a for a, _ in logs) / len(logs)
    mean_e = sum(b for _, b in logs) / len(logs)
    slope = sum((a - mean_n) * (b - mean_e) for a, b in logs) / sum((a - mean_n) ** 2 for a, _ in logs)
    return -slope


_CONTRACT = ("denoiser", "x", "sigmas", "cond", "noise", "callback")


def check_signature(fn: Callable[..., Tensor]) -> None:
    """The function takes ``(denoiser, x, sigmas, *, cond, noise, callback, ...)``."""
    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params]
    if names[:3] != ["denoiser", "x", "sigmas"]:
        raise AssertionError(f"sampler must start with (denoiser, x, sigmas, ...), got {names[:3]}")
    for keyword in _CONTRACT[3:]:
        param = inspect.signature(fn).parameters.get(keyword)
        if param is None or param.kind is not param.KEYWORD_ONLY or param.default is not None:
            raise AssertionError(f"sampler must take keyword-only {keyword}=None")


def check_preserves_tensor(
    spec: SamplerSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> None:
    """Output has the input's shape, dtype and device, is finite, and the input is left untouched.

    Sigmas stay float32 on the CPU whatever the latent's dtype and device, as schedules make
    them: a sampler must not let them promote or move the latent.
    """
    target, device = GaussianTarget(), torch.device(device)
    sigmas = _karras(6, 0.05, 10.0).to(torch.float32)
    x = torch.cat([target.start((1, 3, 4, 5), float(sigmas[0]), seed=s, dtype=dtype) for s in (0, 1)]).to(device)
    x_before, sigmas_before = x.clone(), sigmas.clone()
    noise = noise_for_sampler(spec.noise, x, sigmas, [1000, 1001])
    out = spec.sample(target.denoiser(), x, sigmas, noise=noise)
    if not torch.equal(x, x_before) or not torch.equal(sigmas, sigmas_before):
        raise AssertionError("sampler modified its input latent or sigmas in place")
    if out.shape != (2, 3, 4, 5) or out.dtype != dtype or out.device != x.device:
        raise AssertionError(
            f"sampler returned {tuple(out.shape)} {out.dtype} {out.device}, not (2, 3, 4, 5) {dtype} {x.device}"
        )
    if not bool(torch.isfinite(out).all()):
        raise AssertionError("sampler returned non-finite values on the Gaussian target")


def check_deterministic(spec: SamplerSpec) -> None:
    """Same seeds give bit-identical results; image k of a batch equals seed k run alone."""
    target, sigmas = GaussianTarget(), _karras(8, 0.05, 10.0)
    batch = run_sampler(spec, target, sigmas, batch=4)
    again = run_sampler(spec, target, sigmas, batch=4)
    if not torch.equal(batch, again):
        raise AssertionError("two runs with the same seeds differ")
    for k in range(4):
        alone = run_sampler(spec, target, sigmas, batch=1, seeds=[k])
        if not torch.allclose(batch[k : k + 1], alone, rtol=0, atol=1e-10):
            raise AssertionError(f"image {k} of a batch differs from the same seed run alone")


def check_gaussian_moments(
    spec: SamplerSpec, steps: int = 80, tolerance: float = 0.04, *, consistency_model: bool = False
) -> None:
    """Samples of the Gaussian target have its mean and std within ``tolerance``.

    8 x 32 x 32 samples after 80 Karras steps: the statistics' own sampling error is about
    0.005, and the first-order samplers' bias 0.025 (euler_ancestral, ddpm), so a sampler
    whose spread is off by 7% fails.

    ``consistency_model=True`` drives the sampler with the exact consistency function
    instead of the denoiser, for samplers meant for consistency models (``lcm``).
    """
    target = GaussianTarget()
    sigmas = _karras(steps, 0.03, 14.6)
    model = target.consistency_function() if consistency_model else target.denoiser()
    x = torch.cat([target.start((1, 1, 32, 32), float(sigmas[0]), seed=s) for s in range(8)])
    out = spec.sample(model, x, sigmas, noise=noise_for_sampler(spec.noise, x, sigmas, range(1000, 1008)))
    mean, std = float(out.mean()), float(out.std())
    if abs(mean - target.mu) > tolerance or abs(std - target.s) > tolerance:
        raise AssertionError(
            f"{spec.name}: sample mean {mean:.4f} / std {std:.4f}, expected {target.mu} / {target.s} within {tolerance}"
        )


def check_sampler(sampler: SamplerSpec | Callable[..., Tensor] | str, *, consistency_model: bool = False) -> None:
    """Run every conformance check; raises AssertionError naming the first failure.

    Set ``consistency_model`` for samplers meant for consistency models (see
    :func:`check_gaussian_moments`).
    """
    spec = _resolve(sampler)
    check_signature(spec.fn)
    check_preserves_tensor(spec)
    check_deterministic(spec)
    check_gaussian_moments(spec, consistency_model=consistency_model)


try:  # pytest plugin: ``latentrt_check_sampler`` fixture
    import pytest

    @pytest.fixture
    def latentrt_check_sampler() -> Callable[[SamplerSpec | Callable[..., Tensor] | str], None]:
        """Fixture returning :func:`check_sampler`."""
        return check_sampler

except ImportError:  # pragma: no cover - pytest is optional at run time
    pass
