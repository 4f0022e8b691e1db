"""DPM-Solver++ samplers against k-diffusion's formulas (float64, tolerance 1e-5).

Both sides receive the same kind of noise: identically built :class:`BrownianTreeNoise`
instances for the SDE samplers, identically seeded :class:`GaussianNoise` for 2S a.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from kdiffusion_ref import PARITY_SIGMAS
from kdiffusion_ref import kdiff_model as _kdiff_model
from kdiffusion_ref import parity_setup as _setup

from latentrt.core.errors import InvalidRequest
from latentrt.core.noise import BrownianTreeNoise, GaussianNoise
from latentrt.core.protocols import NoiseSource, StepInfo
from latentrt.core.registry import Registry
from latentrt.testing import check_sampler, convergence_order

TOL = 1e-5
SEEDS = [11, 12]
SIGMAS = list(PARITY_SIGMAS)


def _brownian(x: torch.Tensor) -> NoiseSource:
    return BrownianTreeNoise(x, SEEDS, 0.1, 14.6)


def _gaussian(x: torch.Tensor) -> NoiseSource:
    return GaussianNoise.from_seeds(x, SEEDS)


# (our name, k-diffusion function, noise factory or None, options)
PARITY: list[tuple[str, str, Callable[[torch.Tensor], NoiseSource] | None, dict[str, Any]]] = [
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", _gaussian, {"eta": 1.0}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", _gaussian, {"eta": 0.0}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", _gaussian, {"eta": 0.7, "s_noise": 1.1}),
    ("dpmpp_sde", "sample_dpmpp_sde", _brownian, {"eta": 1.0}),
    ("dpmpp_sde", "sample_dpmpp_sde", _brownian, {"eta": 0.0}),
    ("dpmpp_sde", "sample_dpmpp_sde", _brownian, {"eta": 1.0, "s_noise": 0.9, "r": 1 / 3}),
    ("dpmpp_2m", "sample_dpmpp_2m", None, {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", _brownian, {"eta": 1.0}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", _brownian, {"eta": 0.0}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", _brownian, {"eta": 1.0, "solver_type": "heun"}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", _brownian, {"eta": 0.0, "solver_type": "heun"}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", _brownian, {"eta": 0.5, "s_noise": 1.2, "solver_type": "midpoint"}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", _brownian, {"eta": 1.0}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", _brownian, {"eta": 0.0}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", _brownian, {"eta": 1.0, "s_noise": 0.8}),
]


@pytest.mark.parametrize(("name", "ref_name", "make_noise", "options"), PARITY)
def test_matches_kdiffusion(
    registry: Registry,
    kdiff: types.ModuleType,
    name: str,
    ref_name: str,
    make_noise: Callable[[torch.Tensor], NoiseSource] | None,
    options: dict[str, Any],
) -> None:
    target, sigmas, x = _setup()
    noise = make_noise(x) if make_noise else None
    ours = registry.sampler(name).sample(target.denoiser(), x.clone(), sigmas, noise=noise, **options)
    ref_kwargs = {"noise_sampler": make_noise(x)} if make_noise else {}
    ref = getattr(kdiff, ref_name)(_kdiff_model(target), x.clone(), sigmas, disable=True, **ref_kwargs, **options)
    assert (ours - ref).abs().max() < TOL


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_2m_sde_heun_matches_kdiffusion_heun_solver(registry: Registry, kdiff: types.ModuleType, eta: float) -> None:
    target, sigmas, x = _setup(seed=3)
    spec = registry.sampler("DPM++ 2M SDE Heun")
    ours = spec.sample(target.denoiser(), x.clone(), sigmas, noise=_brownian(x), eta=eta, s_noise=1.05)
    ref = kdiff.sample_dpmpp_2m_sde(
        _kdiff_model(target),
        x.clone(),
        sigmas,
        disable=True,
        noise_sampler=_brownian(x),
        eta=eta,
        s_noise=1.05,
        solver_type="heun",
    )
    assert (ours - ref).abs().max() < TOL


def test_bad_solver_type_is_refused(registry: Registry) -> None:
    target, sigmas, x = _setup()
    with pytest.raises(InvalidRequest, match="solver_type"):
        registry.sampler("dpmpp_2m_sde").sample(target.denoiser(), x, sigmas, noise=_brownian(x), solver_type="rk4")


@pytest.mark.parametrize(
    "name", ["dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"]
)
def test_stochastic_samplers_need_noise_unless_eta_is_zero(registry: Registry, name: str) -> None:
    target, sigmas, x = _setup()
    spec = registry.sampler(name)
    with pytest.raises(InvalidRequest, match=name):
        spec.sample(target.denoiser(), x, sigmas)
    assert torch.isfinite(spec.sample(target.denoiser(), x, sigmas, eta=0.0)).all()


@pytest.mark.parametrize(
    ("name", "options", "order"),
    [
        ("dpmpp_2m", {}, 2.0),
        ("dpmpp_2s_ancestral", {"eta": 0.0}, 2.0),
        ("dpmpp_sde", {"eta": 0.0}, 2.0),
        ("dpmpp_2m_sde", {"eta": 0.0}, 2.0),
        ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2.0),
        ("dpmpp_2m_sde_heun", {"eta": 0.0}, 2.0),
    ],
)
def test_convergence_order(registry: Registry, name: str, options: dict[str, Any], order: float) -> None:
    assert convergence_order(registry.sampler(name), **options) == pytest.approx(order, abs=0.25)


def test_3m_sde_without_noise_is_third_order(registry: Registry) -> None:
    # the multistep order builds up over the first steps, so the observed slope sits below 3
    assert convergence_order(registry.sampler("dpmpp_3m_sde"), eta=0.0) > 2.6


def test_2m_sde_brownian_noise_is_per_image(registry: Registry) -> None:
    target, sigmas, _ = _setup()
    starts = [target.start((1, 4, 8, 8), float(sigmas[0]), seed=s) for s in (21, 22)]
    batch_x = torch.cat(starts)
    spec = registry.sampler("dpmpp_2m_sde")
    batch = spec.sample(target.denoiser(), batch_x, sigmas, noise=BrownianTreeNoise(batch_x, [5, 6], 0.1, 14.6))
    for k, (start, seed) in enumerate(zip(starts, [5, 6], strict=True)):
        alone = spec.sample(target.denoiser(), start, sigmas, noise=BrownianTreeNoise(start, [seed], 0.1, 14.6))
        assert torch.equal(batch[k : k + 1], alone)


def test_callback_reports_every_step_with_its_sigmas(registry: Registry) -> None:
    target, sigmas, x = _setup()
    steps: list[StepInfo] = []
    registry.sampler("dpmpp_3m_sde").sample(target.denoiser(), x, sigmas, noise=_brownian(x), callback=steps.append)
    assert [s.i for s in steps] == list(range(len(SIGMAS) - 1))
    assert [float(s.sigma) for s in steps] == SIGMAS[:-1]
    assert [float(s.sigma_next) for s in steps] == SIGMAS[1:]


def test_two_evaluations_per_step_for_single_step_solvers(registry: Registry) -> None:
    target, sigmas, x = _setup()
    denoiser = target.denoiser()
    registry.sampler("dpmpp_sde").sample(denoiser, x, sigmas, noise=_brownian(x))
    assert denoiser.calls == 2 * (len(SIGMAS) - 1) - 1  # the last step to 0 is a single Euler step


@pytest.mark.parametrize(
    "name", ["dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"]
)
def test_conformance(registry: Registry, name: str) -> None:
    check_sampler(registry.sampler(name))
