"""latentrt.testing: the conformance checks pass good samplers and catch broken ones."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry, SamplerSpec
from latentrt.plugins.samplers.euler import sample_euler, sample_euler_ancestral
from latentrt.testing import GaussianTarget, check_sampler, convergence_order


def _euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Conditioning | None) -> Tensor:
    """Plain Euler, the base the broken samplers below spoil one way each."""
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoiser(x, sigma * x.new_ones([x.shape[0]]), cond)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return x


def good_sampler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Plain Euler, correctly wrapped."""
    return _euler(denoiser, x, sigmas, cond)


def positional_extras(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Contract keywords are positional-or-keyword, not keyword-only."""
    return _euler(denoiser, x, sigmas, cond)


def renamed_model(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """First parameter is not called ``denoiser``."""
    return _euler(model, x, sigmas, cond)


def no_callback(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
) -> Tensor:
    """Lacks the ``callback`` keyword."""
    return _euler(denoiser, x, sigmas, cond)


def required_cond(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """``cond`` has no default."""
    return _euler(denoiser, x, sigmas, cond)


def changes_dtype(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Works in float64 and forgets to cast back."""
    return _euler(denoiser, x.double(), sigmas.double(), cond)


def changes_shape(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Drops the channel dimension."""
    return _euler(denoiser, x, sigmas, cond)[:, 0]


def returns_nan(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Divides by the final sigma, 0."""
    return _euler(denoiser, x, sigmas, cond) / sigmas[-1] * 0


def uses_batch_mean(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Normalises with statistics of the whole batch, so an image depends on its batch-mates."""
    out = _euler(denoiser, x, sigmas, cond)
    return out - 0.1 * (out.mean() - out.mean(dim=(1, 2, 3), keepdim=True))


def shared_noise(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Draws its own unseeded noise instead of using ``noise``: not reproducible."""
    out = _euler(denoiser, x, sigmas, cond)
    return out + 1e-3 * torch.randn_like(out)


def biased(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Off by a constant: well-formed, deterministic, wrong."""
    return _euler(denoiser, x, sigmas, cond) + 0.25


def too_narrow(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Right mean, half the spread (over-denoised)."""
    out = _euler(denoiser, x, sigmas, cond)
    return 0.5 + 0.5 * (out - 0.5)


def mutates_input(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Correct result, but overwrites the caller's latents in place."""
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoiser(x, sigma * x.new_ones([x.shape[0]]), cond)
        x += (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return x


def test_good_function_passes() -> None:
    check_sampler(good_sampler)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "Euler a", "k_euler"])
def test_builtins_pass_by_name(name: str) -> None:
    check_sampler(name)


def test_builtins_pass_as_spec_and_function(registry: Registry) -> None:
    check_sampler(registry.sampler("euler_ancestral"))
    check_sampler(sample_euler)
    check_sampler(sample_euler_ancestral)


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        (positional_extras, "keyword-only cond"),
        (renamed_model, "must start with"),
        (no_callback, "keyword-only callback"),
        (required_cond, "keyword-only cond"),
        (changes_dtype, "float64"),
        (changes_shape, r"\(2, 4, 5\)"),
        (returns_nan, "non-finite"),
        (uses_batch_mean, "differs from the same seed run alone"),
        (shared_noise, "same seeds differ"),
        (biased, "sample mean"),
        (too_narrow, "std"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_broken_samplers_are_rejected(broken: Callable[..., Tensor], match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_sampler(broken)


def test_in_place_mutation_is_rejected() -> None:
    with pytest.raises(AssertionError, match="modified its input"):
        check_sampler(mutates_input)


def test_mutating_sampler_really_mutates() -> None:
    # the premise of test_in_place_mutation_is_rejected
    target = GaussianTarget()
    x = target.start((1, 1, 4, 4), 10.0)
    before = x.clone()
    mutates_input(target.denoiser(), x, torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64))
    assert not torch.equal(x, before)


def test_broken_sampler_registered_by_spec_is_rejected() -> None:
    spec = SamplerSpec(name="biased", fn=biased, label="Biased", aliases=(), plugin="test")
    with pytest.raises(AssertionError, match="biased: sample mean"):
        check_sampler(spec)


@pytest.mark.parametrize("sampler", [sample_euler, "euler"])
def test_convergence_order_of_euler_is_one(sampler: Callable[..., Tensor] | str) -> None:
    assert convergence_order(sampler) == pytest.approx(1.0, abs=0.15)


def test_convergence_order_of_a_biased_sampler_is_low() -> None:
    # a constant offset does not shrink with the step count: the error stalls at 0.25
    assert convergence_order(biased) < 0.5


def test_gaussian_target_is_consistent() -> None:
    target = GaussianTarget(mu=0.3, s=0.7)
    x = target.start((2, 1, 64, 64), 5.0, seed=1)
    assert float(x.mean()) == pytest.approx(0.3, abs=0.05)
    assert float(x.std()) == pytest.approx((0.7**2 + 5.0**2) ** 0.5, rel=0.03)
    # the ODE solution composes, and at sigma = 0 it has the data's spread
    mid = target.ode_solution(x, 5.0, 1.0)
    assert torch.allclose(target.ode_solution(mid, 1.0, 0.0), target.ode_solution(x, 5.0, 0.0))
    assert float(target.ode_solution(x, 5.0).std()) == pytest.approx(0.7, rel=0.03)
    # the exact denoiser at sigma -> 0 is the identity, at large sigma it is the mean
    d = target.denoiser()
    assert torch.allclose(d(x, torch.full((2,), 1e-6, dtype=torch.float64)), x)
    assert torch.allclose(d(x, torch.full((2,), 1e6, dtype=torch.float64)), torch.full_like(x, 0.3), atol=1e-6)
    assert d.calls == 2


def test_denoiser_enforces_the_sigma_shape() -> None:
    target = GaussianTarget()
    x = target.start((2, 1, 4, 4), 1.0)
    with pytest.raises(AssertionError, match=r"sigma must have shape \[batch\]"):
        target.denoiser()(x, torch.tensor(1.0, dtype=torch.float64))


def test_pytest_fixture_is_check_sampler(latentrt_check_sampler: Callable[..., None]) -> None:
    # provided by the pytest11 entry point latentrt installs, no conftest involved
    assert latentrt_check_sampler is check_sampler
    latentrt_check_sampler("euler")
