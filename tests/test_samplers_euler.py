"""Euler samplers against k-diffusion's formulas (float64, tolerance 1e-5)."""

from __future__ import annotations

import types

import pytest
import torch
from kdiffusion_ref import kdiff_model as _kdiff_model
from kdiffusion_ref import parity_setup as _setup

from latentrt.core.noise import GaussianNoise
from latentrt.core.registry import Registry
from latentrt.testing import convergence_order

TOL = 1e-5


def test_euler_matches_kdiffusion(registry: Registry, kdiff: types.ModuleType) -> None:
    target, sigmas, x = _setup()
    ours = registry.sampler("euler").sample(target.denoiser(), x.clone(), sigmas)
    ref = kdiff.sample_euler(_kdiff_model(target), x.clone(), sigmas, disable=True)
    assert (ours - ref).abs().max() < TOL


def test_euler_churn_matches_kdiffusion(registry: Registry, kdiff: types.ModuleType) -> None:
    target, sigmas, x = _setup()
    # churn at every step: k-diffusion draws eps every step, we (like ComfyUI) only when gamma > 0
    options = {"s_churn": 1.0, "s_noise": 1.003}
    noise = GaussianNoise.from_seeds(x, [1, 2])
    ours = registry.sampler("euler").sample(target.denoiser(), x.clone(), sigmas, noise=noise, **options)
    ref_noise = GaussianNoise.from_seeds(x, [1, 2])
    torch_randn_like = torch.randn_like
    try:  # k-diffusion's churn draws torch.randn_like(x): feed it the same noise stream
        torch.randn_like = lambda t, **_: ref_noise(torch.tensor(0.0), torch.tensor(0.0))  # type: ignore[assignment]
        ref = kdiff.sample_euler(_kdiff_model(target), x.clone(), sigmas, disable=True, **options)
    finally:
        torch.randn_like = torch_randn_like  # type: ignore[assignment]
    assert (ours - ref).abs().max() < TOL


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_euler_ancestral_matches_kdiffusion(registry: Registry, kdiff: types.ModuleType, eta: float) -> None:
    target, sigmas, x = _setup()
    ours = registry.sampler("Euler a").sample(
        target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [5, 6]), eta=eta
    )
    ref = kdiff.sample_euler_ancestral(
        _kdiff_model(target),
        x.clone(),
        sigmas,
        disable=True,
        eta=eta,
        noise_sampler=GaussianNoise.from_seeds(x, [5, 6]),
    )
    assert (ours - ref).abs().max() < TOL


def test_euler_is_first_order(registry: Registry) -> None:
    assert convergence_order(registry.sampler("euler")) == pytest.approx(1.0, abs=0.15)
