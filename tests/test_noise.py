"""Seeds, per-image noise and the Brownian tree."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.noise import (
    BrownianTree,
    BrownianTreeNoise,
    GaussianNoise,
    batch_seeds,
    initial_noise,
    make_generators,
    noise_for_sampler,
)


def test_initial_noise_matches_diffusers_generator_list() -> None:
    seeds = [42, 43, 7]
    ours = initial_noise((4, 8, 8), make_generators(seeds))
    reference = randn_tensor((3, 4, 8, 8), generator=[torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(ours, reference)


def test_initial_noise_matches_diffusers_single_generator_for_one_image() -> None:
    ours = initial_noise((4, 8, 8), make_generators([1234]))
    reference = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(1234))
    assert torch.equal(ours, reference)


def test_gaussian_noise_is_per_image() -> None:
    like = torch.zeros(3, 2, 4, 4)
    batch = GaussianNoise.from_seeds(like, [5, 6, 7])
    alone = GaussianNoise.from_seeds(like[:1], [6])
    first, second = batch(torch.tensor(1.0), torch.tensor(0.5)), batch(torch.tensor(0.5), torch.tensor(0.1))
    assert torch.equal(first[1:2], alone(torch.tensor(1.0), torch.tensor(0.5)))
    assert torch.equal(second[1:2], alone(torch.tensor(0.5), torch.tensor(0.1)))
    assert not torch.equal(first, second)


def test_gaussian_noise_follows_like_dtype() -> None:
    like = torch.zeros(1, 2, 3, dtype=torch.float64)
    assert GaussianNoise.from_seeds(like, [0])(torch.tensor(1.0), torch.tensor(0.0)).dtype == torch.float64


def test_brownian_tree_is_consistent_in_any_query_order() -> None:
    tree_a = BrownianTree(3, (16,), 0.0, 10.0)
    tree_b = BrownianTree(3, (16,), 0.0, 10.0)
    points = [7.3, 0.2, 9.99, 4.0, 5.55]
    first = [tree_a(t) for t in points]
    second = [tree_b(t) for t in reversed(points)][::-1]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.equal(tree_a(0.0), torch.zeros(16, dtype=torch.float64))


def test_brownian_tree_increments_have_brownian_statistics() -> None:
    """Var W(t) = t - t0; increments over disjoint intervals are uncorrelated."""
    tree = BrownianTree(11, (20000,), 0.0, 8.0)
    w2, w5, w8 = tree(2.0), tree(5.0), tree(8.0)
    assert float(w2.var()) == pytest.approx(2.0, rel=0.05)
    assert float((w5 - w2).var()) == pytest.approx(3.0, rel=0.05)
    assert float((w8 - w5).var()) == pytest.approx(3.0, rel=0.05)
    correlation = torch.corrcoef(torch.stack([w2, w5 - w2]))[0, 1]
    assert abs(float(correlation)) < 0.03


def test_brownian_noise_is_unit_variance_and_batch_invariant() -> None:
    like = torch.zeros(2, 4, 32, 32)
    batch = BrownianTreeNoise(like, [1, 2], 0.03, 14.6)
    alone = BrownianTreeNoise(like[:1], [2], 0.03, 14.6)
    step = batch(torch.tensor(3.0), torch.tensor(1.5))
    assert float(step.std()) == pytest.approx(1.0, abs=0.05)
    assert torch.equal(step[1:2], alone(torch.tensor(3.0), torch.tensor(1.5)))


def test_brownian_noise_subdivision_adds_up() -> None:
    """An increment over [a, c] equals the scaled sum of those over [a, b] and [b, c]."""
    like = torch.zeros(1, 64, dtype=torch.float64)
    noise = BrownianTreeNoise(like, [9], 0.1, 10.0)
    a, b, c = 6.0, 2.5, 1.0
    whole = noise(torch.tensor(a), torch.tensor(c)) * math.sqrt(a - c)
    parts = noise(torch.tensor(a), torch.tensor(b)) * math.sqrt(a - b) + noise(
        torch.tensor(b), torch.tensor(c)
    ) * math.sqrt(b - c)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-9)


def test_noise_for_sampler_kinds() -> None:
    like, sigmas = torch.zeros(2, 3), torch.tensor([5.0, 1.0, 0.0])
    assert noise_for_sampler("none", like, sigmas, [0, 1]) is None
    assert isinstance(noise_for_sampler("gaussian", like, sigmas, [0, 1]), GaussianNoise)
    assert isinstance(noise_for_sampler("brownian", like, sigmas, [0, 1]), BrownianTreeNoise)
    with pytest.raises(InvalidRequest, match="unknown noise kind"):
        noise_for_sampler("pink", like, sigmas, [0, 1])


def test_brownian_noise_for_a_one_step_schedule_spans_from_zero() -> None:
    like = torch.zeros(1, 8)
    noise = noise_for_sampler("brownian", like, torch.tensor([14.6, 0.0]), [3])
    assert noise is not None
    assert noise(torch.tensor(14.6), torch.tensor(5.0)).shape == like.shape


def test_gaussian_noise_continues_the_generators_that_drew_the_initial_latent() -> None:
    """As diffusers' ancestral schedulers do: the first injected noise is the generator's next draw,
    not a repeat of the initial latent."""
    generators = make_generators([7])
    x = initial_noise((4, 4), generators)
    noise = noise_for_sampler("gaussian", x, torch.tensor([1.0, 0.0]), [7], generators=generators)
    assert noise is not None
    first = noise(torch.tensor(1.0), torch.tensor(0.5))
    reference = torch.Generator().manual_seed(7)
    torch.randn((4, 4), generator=reference)
    assert torch.equal(first, torch.randn((4, 4), generator=reference).unsqueeze(0))
    assert not torch.equal(first, x)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_bad_seeds_are_refused(seed: int) -> None:
    with pytest.raises(InvalidRequest, match="seed must be"):
        make_generators([seed])


def test_bad_batch_and_tree_arguments_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="batch size"):
        batch_seeds(1, 0)
    with pytest.raises(InvalidRequest, match="one generator per image"):
        GaussianNoise(torch.zeros(2, 3), make_generators([1]))
    with pytest.raises(InvalidRequest, match="t0 < t1"):
        BrownianTree(0, (2,), 1.0, 1.0)
    assert batch_seeds(10, 3) == [10, 11, 12]
