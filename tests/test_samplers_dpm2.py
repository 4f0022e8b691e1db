"""DPM2 samplers against k-diffusion's formulas (float64, tolerance 1e-5)."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from kdiffusion_ref import kdiff_model as _kdiff_model
from kdiffusion_ref import parity_setup as _setup

from latentrt.core.errors import InvalidRequest
from latentrt.core.noise import GaussianNoise
from latentrt.core.registry import Registry
from latentrt.testing import check_sampler, convergence_order

TOL = 1e-5


def test_dpm_2_matches_kdiffusion(registry: Registry, kdiff: types.ModuleType) -> None:
    target, sigmas, x = _setup()
    ours = registry.sampler("DPM2").sample(target.denoiser(), x.clone(), sigmas)
    ref = kdiff.sample_dpm_2(_kdiff_model(target), x.clone(), sigmas, disable=True)
    assert (ours - ref).abs().max() < TOL


def test_dpm_2_churn_matches_kdiffusion(
    registry: Registry, kdiff: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, sigmas, x = _setup()
    options: dict[str, Any] = {"s_churn": 1.0, "s_noise": 1.003, "s_tmin": 0.0}  # gamma > 0 at every step
    ours = registry.sampler("k_dpm_2").sample(
        target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [1, 2]), **options
    )
    stream, zero = GaussianNoise.from_seeds(x, [1, 2]), torch.tensor(0.0)
    monkeypatch.setattr(torch, "randn_like", lambda t, **_: stream(zero, zero))  # k-diffusion's churn noise
    ref = kdiff.sample_dpm_2(_kdiff_model(target), x.clone(), sigmas, disable=True, **options)
    assert (ours - ref).abs().max() < TOL


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_dpm_2_ancestral_matches_kdiffusion(registry: Registry, kdiff: types.ModuleType, eta: float) -> None:
    target, sigmas, x = _setup()
    ours = registry.sampler("DPM2 a").sample(
        target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [5, 6]), eta=eta, s_noise=0.98
    )
    ref = kdiff.sample_dpm_2_ancestral(
        _kdiff_model(target),
        x.clone(),
        sigmas,
        disable=True,
        eta=eta,
        s_noise=0.98,
        noise_sampler=GaussianNoise.from_seeds(x, [5, 6]),
    )
    assert (ours - ref).abs().max() < TOL


def test_dpm_2_ancestral_needs_noise_only_when_eta_positive(registry: Registry) -> None:
    target, sigmas, x = _setup()
    spec = registry.sampler("k_dpm_2_a")
    with pytest.raises(InvalidRequest, match="noise source"):
        spec.sample(target.denoiser(), x.clone(), sigmas)
    assert torch.isfinite(spec.sample(target.denoiser(), x.clone(), sigmas, eta=0.0)).all()


def test_dpm_2_registration(registry: Registry) -> None:
    dpm_2, ancestral = registry.sampler("dpm_2"), registry.sampler("dpm_2_ancestral")
    assert dpm_2.discard_penultimate_sigma and ancestral.discard_penultimate_sigma
    assert (dpm_2.noise, ancestral.noise) == ("gaussian", "gaussian")  # dpm_2: churn noise


def test_dpm_2_is_second_order(registry: Registry) -> None:
    assert convergence_order(registry.sampler("dpm_2")) == pytest.approx(2.0, abs=0.25)


@pytest.mark.parametrize("name", ["dpm_2", "dpm_2_ancestral"])
def test_conformance(registry: Registry, name: str) -> None:
    check_sampler(registry.sampler(name))
