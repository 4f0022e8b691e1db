"""RES multistep and Restart sampling (float64, tolerance 1e-5).

Neither has a reference implementation installed here, so each is checked against an
independent, straightforward implementation written below from the published method, and
against analytic facts of the Gaussian target.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch

from latentrt.core.errors import InvalidRequest
from latentrt.core.noise import GaussianNoise
from latentrt.core.protocols import NoiseSource, StepInfo
from latentrt.core.registry import Registry
from latentrt.testing import GaussianDenoiser, GaussianTarget, check_sampler, convergence_order

TOL = 1e-5
SIGMAS = [14.6, 7.0, 3.1, 1.2, 0.5, 0.1, 0.0]
Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def _setup(seed: int = 0, s: float = 0.7) -> tuple[GaussianTarget, torch.Tensor, torch.Tensor]:
    target = GaussianTarget(mu=0.3, s=s)
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    return target, sigmas, target.start((2, 4, 8, 8), SIGMAS[0], seed=seed)


def _plain(denoiser: GaussianDenoiser) -> Denoise:
    return lambda x, sigma: denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype), None)


def _karras(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    """Karras et al. 2022, eq. 5, without the trailing zero."""
    lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
    return [(hi + k / (n - 1) * (lo - hi)) ** 7 for k in range(n)]


# -- RES multistep --------------------------------------------------------------------


def reference_res_multistep(
    denoise: Denoise, x: torch.Tensor, sigmas: Sequence[float], eta: float = 0.0, noise: NoiseSource | None = None
) -> torch.Tensor:
    """RES 2nd-order multistep written from the exponential-integrator formula (Zhang et al. 2023).

    In ``t = -log(sigma)`` the ODE is ``dx/dt = D - x``, so over a step of length ``h``
    ``x_next = e^{-h} x + integral_0^h e^{-(h - u)} D(u) du``. With ``D`` taken as the line
    through the current estimate and the previous one (``h_last`` earlier), the integral is
    ``(1 - e^{-h}) D + (h - 1 + e^{-h}) (D - D_old) / h_last``. First and last steps are
    Euler; with ``eta > 0`` each step ends at the ancestral sigma_down and adds noise, and
    ``h_last`` is the previous deterministic step's length (ComfyUI's choice).
    """
    old: tuple[torch.Tensor, float] | None = None
    for sigma, sigma_next in itertools.pairwise(sigmas):
        denoised = denoise(x, sigma)
        sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        if old is None or sigma_down == 0:
            x = denoised + (x - denoised) * (sigma_down / sigma)
        else:
            h = math.log(sigma / sigma_down)
            old_denoised, h_last = old
            x = math.exp(-h) * x + (1 - math.exp(-h)) * denoised
            x = x + (h - 1 + math.exp(-h)) / h_last * (denoised - old_denoised)
        if noise is not None and sigma_next > 0:
            x = x + noise(torch.tensor(sigma), torch.tensor(sigma_next)) * sigma_up
        old = (denoised, math.log(sigma / sigma_down)) if sigma_down > 0 else None
    return x


def test_res_multistep_matches_reference(registry: Registry) -> None:
    target, sigmas, x = _setup()
    ours = registry.sampler("Res Multistep").sample(target.denoiser(), x.clone(), sigmas)
    ref = reference_res_multistep(_plain(target.denoiser()), x.clone(), SIGMAS)
    assert (ours - ref).abs().max() < TOL


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_res_multistep_ancestral_matches_reference(registry: Registry, eta: float) -> None:
    target, sigmas, x = _setup(seed=1)
    spec = registry.sampler("res_multistep_ancestral")
    ours = spec.sample(target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [3, 4]), eta=eta)
    ref = reference_res_multistep(
        _plain(target.denoiser()), x.clone(), SIGMAS, eta=eta, noise=GaussianNoise.from_seeds(x, [3, 4])
    )
    assert (ours - ref).abs().max() < TOL


def test_res_multistep_ancestral_s_noise_and_eta_zero(registry: Registry) -> None:
    target, sigmas, x = _setup(seed=2)
    spec = registry.sampler("res_multistep_ancestral")
    plain = registry.sampler("res_multistep").sample(target.denoiser(), x.clone(), sigmas)
    assert torch.equal(spec.sample(target.denoiser(), x.clone(), sigmas, eta=0.0), plain)
    half = spec.sample(target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [3, 4]), s_noise=0.5)
    full = spec.sample(target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [3, 4]), s_noise=1.0)
    none = spec.sample(target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [3, 4]), s_noise=0.0)
    # the noise enters linearly at the final sigma's scale: s_noise = 0.5 lands between
    assert 0 < (half - none).abs().max() < (full - none).abs().max()
    with pytest.raises(InvalidRequest, match="res_multistep_ancestral"):
        spec.sample(target.denoiser(), x, sigmas)


def test_res_multistep_equals_2m_sde_heun_without_noise(registry: Registry) -> None:
    # both integrate the linear interpolant of D exactly: the same second-order exponential integrator
    target, sigmas, x = _setup(seed=4)
    res = registry.sampler("res_multistep").sample(target.denoiser(), x.clone(), sigmas)
    sde = registry.sampler("dpmpp_2m_sde").sample(target.denoiser(), x.clone(), sigmas, eta=0.0, solver_type="heun")
    assert (res - sde).abs().max() < 1e-10


def test_res_multistep_is_exact_for_a_point_mass(registry: Registry) -> None:
    # data = mu exactly: D is constant, the exponential integrator solves the ODE exactly
    target, _, x = _setup(s=0.0)
    sigmas = torch.tensor([14.6, 9.0, 4.0, 2.5, 0.7, 0.2], dtype=torch.float64)
    out = registry.sampler("res_multistep").sample(
        target.denoiser(), x.clone(), torch.cat([sigmas, sigmas.new_zeros(1)])
    )
    assert (out - target.mu).abs().max() < 1e-12
    partial = registry.sampler("res_multistep").fn(target.denoiser(), x.clone(), sigmas)
    assert (partial - target.ode_solution(x, 14.6, 0.2)).abs().max() < 1e-12


def test_res_multistep_is_second_order(registry: Registry) -> None:
    assert convergence_order(registry.sampler("res_multistep")) == pytest.approx(2.0, abs=0.25)


# -- Restart ----------------------------------------------------------------------------


def reference_restart(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource,
    s_noise: float = 1.0,
    restart_list: Mapping[float, tuple[int, int, float]] | None = None,
) -> torch.Tensor:
    """Restart sampling written from Xu et al. 2023, Algorithm 1, with A1111's default plan.

    Heun steps along the schedule; on reaching the sigma nearest a restart interval's
    ``sigma_min``, ``restart_times`` times: add noise up to the sigma nearest ``sigma_max``
    (``x += sqrt(hi^2 - lo^2) * eps``) and solve back down along ``n`` Karras sigmas. A1111's
    default: from 20 steps one interval [0.1, 2] of 9 steps (from 36, two of steps // 4), the
    main schedule re-spaced as Karras over the remaining steps.
    """
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            n, times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = [*_karras(steps - n * times, sigmas[-2], sigmas[0]), 0.0]
            restart_list = {0.1: (n + 1, times, 2.0)}

    def nearest(value: float) -> int:
        return min(range(len(sigmas)), key=lambda j: abs(sigmas[j] - value))

    def heun(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        d = (x - denoise(x, sigma)) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            return x_euler
        return x + (sigma_next - sigma) * (d + (x_euler - denoise(x_euler, sigma_next)) / sigma_next) / 2

    restarts = {nearest(key): value for key, value in restart_list.items()}
    for i in range(len(sigmas) - 1):
        x = heun(x, sigmas[i], sigmas[i + 1])
        if i + 1 in restarts and nearest(restarts[i + 1][2]) < i + 1:
            n, times, _ = restarts[i + 1]
            lo, hi = sigmas[i + 1], sigmas[nearest(restarts[i + 1][2])]
            grid = [hi, *_karras(n, lo, hi)[1:-1], lo]
            for _ in range(times):
                x = x + noise(torch.tensor(lo), torch.tensor(hi)) * s_noise * math.sqrt(hi**2 - lo**2)
                for a, b in itertools.pairwise(grid):
                    x = heun(x, a, b)
    return x


def _karras_schedule(steps: int) -> torch.Tensor:
    return torch.tensor([*_karras(steps, 0.03, 14.6), 0.0], dtype=torch.float64)


@pytest.mark.parametrize("steps", [10, 24, 40])
def test_restart_matches_reference(registry: Registry, steps: int) -> None:
    target, _, x = _setup(seed=5)
    sigmas = _karras_schedule(steps)
    ours = registry.sampler("Restart").sample(
        target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [7, 8]), s_noise=1.003
    )
    ref = reference_restart(
        _plain(target.denoiser()), x.clone(), sigmas.tolist(), GaussianNoise.from_seeds(x, [7, 8]), s_noise=1.003
    )
    assert (ours - ref).abs().max() < TOL


def test_restart_custom_list_matches_reference(registry: Registry) -> None:
    target, sigmas, x = _setup(seed=6)
    plan = {0.5: (4, 2, 3.1), 0.1: (3, 1, 1.2)}
    ours = registry.sampler("restart").sample(
        target.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, [1, 2]), restart_list=plan
    )
    ref = reference_restart(
        _plain(target.denoiser()), x.clone(), SIGMAS, GaussianNoise.from_seeds(x, [1, 2]), restart_list=plan
    )
    assert (ours - ref).abs().max() < TOL


@pytest.mark.parametrize("steps", [10, 24, 40])
def test_restart_keeps_the_step_count(registry: Registry, steps: int) -> None:
    target, _, x = _setup()
    denoiser, reports = target.denoiser(), list[StepInfo]()
    registry.sampler("restart").sample(
        denoiser, x, _karras_schedule(steps), noise=GaussianNoise.from_seeds(x, [1, 2]), callback=reports.append
    )
    assert [r.i for r in reports] == list(range(steps))
    assert denoiser.calls == 2 * steps - 1  # Heun everywhere, Euler for the last step to 0
    assert float(reports[-1].sigma_next) == 0.0


def test_restart_on_a_point_mass_lands_on_it_whatever_the_noise(registry: Registry) -> None:
    # D is constant: Heun solves each step exactly, and every restart is solved back down exactly
    target, _, x = _setup(s=0.0)
    out = registry.sampler("restart").sample(
        target.denoiser(), x, _karras_schedule(40), noise=GaussianNoise.from_seeds(x, [1, 2])
    )
    assert (out - target.mu).abs().max() < 1e-12


def test_restart_without_restarts_is_heun(registry: Registry) -> None:
    assert convergence_order(registry.sampler("restart"), restart_list={}) == pytest.approx(2.0, abs=0.25)
    target, _, x = _setup()
    out = registry.sampler("restart").sample(target.denoiser(), x, _karras_schedule(12))  # under 20: no noise needed
    assert torch.isfinite(out).all()


def test_restart_refuses_a_bad_restart_list(registry: Registry) -> None:
    target, sigmas, x = _setup()
    with pytest.raises(InvalidRequest, match="restart_list"):
        registry.sampler("restart").sample(target.denoiser(), x, sigmas, restart_list={0.1: (1, 1, 2.0)})


@pytest.mark.parametrize("name", ["res_multistep", "res_multistep_ancestral", "restart"])
def test_conformance(registry: Registry, name: str) -> None:
    check_sampler(registry.sampler(name))
