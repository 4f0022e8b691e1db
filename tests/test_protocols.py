"""Conditioning batching and the runtime-checkable protocols."""

from __future__ import annotations

import pytest
import torch

from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.noise import GaussianNoise
from latentrt.core.protocols import Conditioning, Denoiser, ModelSampling, NoiseSource
from latentrt.testing import GaussianTarget


def test_conditioning_cat_and_select_round_trip() -> None:
    cond = Conditioning(torch.randn(1, 77, 8), pooled=torch.randn(1, 4), extra={"time_ids": torch.randn(1, 6)})
    uncond = Conditioning(torch.randn(1, 77, 8), pooled=torch.randn(1, 4), extra={"time_ids": torch.randn(1, 6)})
    both = Conditioning.cat([cond, uncond])
    assert both.batch_size == 2
    assert torch.equal(both.select(slice(1, 2)).context, uncond.context)
    assert torch.equal(both.extra["time_ids"][0], cond.extra["time_ids"][0])
    assert set(both.tensors()) == {"context", "pooled", "time_ids"}


def test_conditioning_cat_pads_long_prompts_by_repeating_chunks() -> None:
    short = Conditioning(torch.randn(1, 77, 8))
    long = Conditioning(torch.randn(1, 154, 8))
    both = Conditioning.cat([short, long])
    assert both.context.shape == (2, 154, 8)
    assert torch.equal(both.context[0, 77:], short.context[0])


def test_conditioning_cat_refuses_mismatched_parts() -> None:
    with pytest.raises(ValueError, match="different tensors"):
        Conditioning.cat(
            [Conditioning(torch.zeros(1, 77, 8)), Conditioning(torch.zeros(1, 77, 8), pooled=torch.zeros(1, 4))]
        )
    with pytest.raises(ValueError, match="cannot pad"):
        Conditioning.cat([Conditioning(torch.zeros(1, 77, 8)), Conditioning(torch.zeros(1, 100, 8))])
    with pytest.raises(ValueError, match="at least one"):
        Conditioning.cat([])


def test_reference_objects_satisfy_the_protocols() -> None:
    assert isinstance(sd_model_sampling(), ModelSampling)
    assert isinstance(GaussianTarget().denoiser(), Denoiser)
    assert isinstance(GaussianNoise.from_seeds(torch.zeros(1, 2), [0]), NoiseSource)
