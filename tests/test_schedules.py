"""Built-in sigma schedules against k-diffusion, diffusers, scipy and ComfyUI's formulas.

ComfyUI's formulas (``comfy/samplers.py``, ``comfy_extras/nodes_align_your_steps.py``)
are re-derived here independently in numpy from the model's sigma table, so a slip in
our torch code cannot hide in a shared helper.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler

from latentrt.core.errors import InvalidRequest, PluginError
from latentrt.core.model_sampling import DiscreteModelSampling, sd_model_sampling
from latentrt.core.registry import Registry
from latentrt.plugins import schedules

STEPS = (1, 2, 3, 10, 25, 50, 150)
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def ms() -> DiscreteModelSampling:
    return sd_model_sampling()


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Make torch's default dtype float64 so k-diffusion's reference is computed in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _assert_rel(ours: torch.Tensor, ref: torch.Tensor | np.ndarray | Sequence[float], rtol: float) -> None:
    """Same length, last both 0, and the nonzero sigmas within ``rtol`` relative."""
    ref_t = torch.as_tensor(np.asarray(ref, dtype=np.float64))
    assert ours.shape == ref_t.shape
    assert float(ours[-1]) == 0.0 and float(ref_t[-1]) == 0.0
    torch.testing.assert_close(ours[:-1].double(), ref_t[:-1], rtol=rtol, atol=0)


def _comfy_sigma(ms: DiscreteModelSampling, t: np.ndarray) -> np.ndarray:
    """ComfyUI ``ModelSamplingDiscrete.sigma``: log-sigma interpolated between floor(t) and ceil(t)."""
    log_sigmas = np.log(ms.sigmas.numpy().astype(np.float64))
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - low
    sigmas: np.ndarray = np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])
    return sigmas


# -- k-diffusion's closed forms (float64 reference, our float32 result: 1e-6 relative) ----


@pytest.mark.parametrize("steps", STEPS)
def test_karras_exponential_polyexponential_match_kdiffusion(
    kdiff: types.ModuleType, float64_default: None, ms: DiscreteModelSampling, steps: int
) -> None:
    lo, hi = ms.sigma_min, ms.sigma_max
    _assert_rel(schedules.karras(steps, ms), kdiff.get_sigmas_karras(steps, lo, hi), 1e-6)
    ref = kdiff.get_sigmas_karras(steps, 0.1, 80.0, rho=3.0)
    _assert_rel(schedules.karras_sigmas(steps, 0.1, 80.0, rho=3.0), ref, 1e-6)
    _assert_rel(schedules.exponential(steps, ms), kdiff.get_sigmas_exponential(steps, lo, hi), 1e-6)
    _assert_rel(schedules.polyexponential(steps, ms), kdiff.get_sigmas_polyexponential(steps, lo, hi, rho=1.0), 1e-6)
    ref = kdiff.get_sigmas_polyexponential(steps, 0.1, 80.0, rho=2.5)
    _assert_rel(schedules.polyexponential_sigmas(steps, 0.1, 80.0, rho=2.5), ref, 1e-6)


@pytest.mark.parametrize("steps", STEPS[1:])  # diffusers' 1-step schedule collapses to [sigma_min, 0]
def test_karras_matches_diffusers(ms: DiscreteModelSampling, steps: int) -> None:
    euler = EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    euler.set_timesteps(steps)
    # diffusers' float32 beta cumprod moves its sigma_min by 1.3e-5 relative: allow 1e-4.
    _assert_rel(schedules.karras(steps, ms), euler.sigmas, 1e-4)


# -- schedules over timesteps ------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
def test_normal_and_sgm_uniform_match_comfyui(ms: DiscreteModelSampling, steps: int) -> None:
    top = len(ms.sigmas) - 1  # ComfyUI: timestep(sigma_max) = 999, timestep(sigma_min) = 0
    normal_t = torch.linspace(top, 0, steps).numpy().astype(np.float64)  # float32, as ComfyUI
    sgm_t = torch.linspace(top, 0, steps + 1)[:-1].numpy().astype(np.float64)
    _assert_rel(schedules.normal(steps, ms), np.append(_comfy_sigma(ms, normal_t), 0.0), 1e-6)
    _assert_rel(schedules.sgm_uniform(steps, ms), np.append(_comfy_sigma(ms, sgm_t), 0.0), 1e-6)


@pytest.mark.parametrize(("steps", "rtol"), [(2, 2e-5), (4, 2e-5), (10, 2e-5), (28, 2e-5), (25, 1e-3), (150, 1e-3)])
def test_normal_matches_diffusers_linspace(ms: DiscreteModelSampling, steps: int, rtol: float) -> None:
    euler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace")
    euler.set_timesteps(steps)
    # On whole timesteps (999 / (steps - 1) an integer) only diffusers' float32 table differs
    # (1.3e-5). Between them diffusers interpolates sigma linearly, we log-linearly (ComfyUI,
    # k-diffusion): they differ by up to (d log sigma)^2 / 8 per table step, 5e-4 near t = 0.
    _assert_rel(schedules.normal(steps, ms), euler.sigmas, rtol)


@pytest.mark.parametrize("steps", [*STEPS, 1000])
def test_simple_matches_comfyui(ms: DiscreteModelSampling, steps: int) -> None:
    table = ms.sigmas.numpy()
    stride = len(table) / steps
    expected = [table[-(1 + int(x * stride))] for x in range(steps)] + [0.0]
    assert schedules.simple(steps, ms).tolist() == np.asarray(expected, dtype=np.float32).tolist()


def _comfy_ddim(table: np.ndarray, steps: int) -> list[float]:
    stride, x, sigs = max(len(table) // steps, 1), 1, [0.0]
    while x < len(table):
        sigs.append(float(table[x]))
        x += stride
    return sigs[::-1]


@pytest.mark.parametrize("steps", [*STEPS, 7, 999])
def test_ddim_uniform_matches_diffusers_ddim_and_comfyui_where_it_keeps_the_contract(
    ms: DiscreteModelSampling, steps: int
) -> None:
    ours = schedules.ddim_uniform(steps, ms)
    ddim = DDIMScheduler(**SD_BETAS, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    ddim.set_timesteps(steps)
    assert torch.equal(ours, torch.cat([ms.sigmas[ddim.timesteps], torch.zeros(1)]))
    comfy = _comfy_ddim(ms.sigmas.numpy(), steps)
    if len(comfy) == steps + 1:  # 1, 2, 10, 25, 50, 999 steps
        assert ours.tolist() == np.asarray(comfy, dtype=np.float32).tolist()
    else:  # ComfyUI returns extra sigmas (7 steps -> 9); we keep the first `steps` timesteps
        assert len(comfy) > steps + 1 and ours.tolist() == np.asarray(comfy[-(steps + 1) :], np.float32).tolist()


# -- beta -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.5, 0.5), (2.0, 3.0), (0.3, 4.0), (5.0, 1.2)])
def test_beta_ppf_matches_scipy(a: float, b: float) -> None:
    quantiles = np.concatenate([np.linspace(0, 1, 201), [1e-12, 1e-6, 1e-3, 1 - 1e-3, 1 - 1e-6, 1 - 1e-12]])
    ours = np.array([schedules.beta_ppf(float(q), a, b) for q in quantiles])
    np.testing.assert_allclose(ours, scipy.stats.beta.ppf(quantiles, a, b), rtol=0, atol=1e-9)
    x = np.linspace(0, 1, 101)
    cdf = [schedules.regularized_incomplete_beta(float(v), a, b) for v in x]
    np.testing.assert_allclose(cdf, scipy.stats.beta.cdf(x, a, b), rtol=0, atol=1e-12)


def _comfy_beta(table: np.ndarray, steps: int) -> list[float]:
    q = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(q, 0.6, 0.6) * (len(table) - 1))
    sigs, last = [], -1.0
    for t in ts:
        if t != last:
            sigs.append(float(table[int(t)]))
        last = t
    return [*sigs, 0.0]


@pytest.mark.parametrize("steps", STEPS)
def test_beta_matches_comfyui_and_repairs_its_duplicates(ms: DiscreteModelSampling, steps: int) -> None:
    ours = schedules.beta(steps, ms)
    comfy = _comfy_beta(ms.sigmas.numpy(), steps)
    if steps < 150:
        assert ours.tolist() == np.asarray(comfy, dtype=np.float32).tolist()
    else:  # ComfyUI drops a repeated timestep 999 (150 sigmas); we move it to 998
        assert len(comfy) == steps and len(ours) == steps + 1
        assert float(ours[1]) == pytest.approx(float(ms.sigmas[998]))
        assert set(comfy) <= set(ours.tolist())


# -- closed forms of the other schedules ----------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
def test_kl_optimal_closed_form(ms: DiscreteModelSampling, steps: int) -> None:
    smin, smax = ms.sigma_min, ms.sigma_max
    u = np.arange(steps) / max(steps - 1, 1)  # ComfyUI divides by steps - 1 (0 at one step)
    expected = np.append(np.tan((1 - u) * math.atan(smax) + u * math.atan(smin)), 0.0)
    _assert_rel(schedules.kl_optimal(steps, ms), expected, 1e-6)


def _comfy_linear_quadratic(steps: int, sigma_max: float, threshold: float = 0.025) -> list[float]:
    if steps == 1:
        return [sigma_max, 0.0]
    ls = steps // 2
    diff, qs = ls - threshold * steps, steps - ls
    qc, lc = diff / (ls * qs**2), threshold / ls - 2 * diff / qs**2
    linear = [i * threshold / ls for i in range(ls)]
    quadratic = [qc * i**2 + lc * i + qc * ls**2 for i in range(ls, steps)]
    return [(1.0 - x) * sigma_max for x in [*linear, *quadratic, 1.0]]


@pytest.mark.parametrize("steps", STEPS)
def test_linear_quadratic_matches_comfyui(ms: DiscreteModelSampling, steps: int) -> None:
    _assert_rel(schedules.linear_quadratic(steps, ms), _comfy_linear_quadratic(steps, ms.sigma_max), 1e-6)


def _comfy_ays(levels: tuple[float, ...], steps: int) -> np.ndarray:
    xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
    sigmas: np.ndarray = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1].copy()
    sigmas[-1] = 0.0
    return sigmas


@pytest.mark.parametrize("model_type", ["SD1", "SDXL"])
def test_align_your_steps(ms: DiscreteModelSampling, model_type: str) -> None:
    levels = schedules.AYS_NOISE_LEVELS[model_type]
    fn = schedules.align_your_steps if model_type == "SD1" else schedules.align_your_steps_sdxl
    published = torch.tensor([*levels[:-1], 0.0], dtype=torch.float32)  # sigma_min becomes 0, as ComfyUI
    assert torch.equal(fn(10, ms), published)
    assert torch.equal(schedules.align_your_steps_sigmas(10, model_type.lower()), published)
    for steps in STEPS:
        _assert_rel(fn(steps, ms), _comfy_ays(levels, steps), 1e-6)


def test_align_your_steps_refuses_unknown_model_types() -> None:
    with pytest.raises(InvalidRequest, match="SDXL"):
        schedules.align_your_steps_sigmas(10, "SD3")


# -- the contract, through the registry -------------------------------------------------------


def _builtin_names(registry: Registry) -> list[str]:
    return [name for name, spec in registry.schedulers.items() if spec.plugin == "latentrt.schedules"]


def test_every_builtin_is_registered(registry: Registry) -> None:
    assert _builtin_names(registry) == [
        "normal", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
        "align_your_steps", "align_your_steps_sdxl", "simple", "ddim_uniform", "beta", "linear_quadratic",
    ]  # fmt: skip


def test_every_schedule_keeps_the_contract(registry: Registry, ms: DiscreteModelSampling) -> None:
    for name in _builtin_names(registry):
        for steps in STEPS:
            sigmas = registry.scheduler(name).sigmas(steps, ms)  # checks decreasing and final 0
            assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,), (name, steps)
            assert bool((sigmas[1:] < sigmas[:-1]).all()) and float(sigmas[-1]) == 0.0, (name, steps)
            assert float(sigmas.min()) >= 0.0 and float(sigmas.max()) <= ms.sigma_max, (name, steps)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps_are_invalid_requests(registry: Registry, ms: DiscreteModelSampling, steps: object) -> None:
    for name in _builtin_names(registry):
        with pytest.raises(InvalidRequest, match="steps"):
            registry.scheduler(name).sigmas(steps, ms)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "most"), [("simple", 1000), ("ddim_uniform", 999), ("beta", 1000)])
def test_table_schedules_refuse_more_steps_than_the_table_has(
    registry: Registry, ms: DiscreteModelSampling, name: str, most: int
) -> None:
    with pytest.raises(InvalidRequest, match=f"at most {most} steps"):
        registry.scheduler(name).sigmas(most + 1, ms)


def test_unknown_schedule_lists_close_names(registry: Registry) -> None:
    with pytest.raises(PluginError, match="karras") as info:
        registry.scheduler("karas")
    assert "valid names" in str(info.value)


@pytest.mark.parametrize(
    ("label", "name"),
    [
        ("Karras", "karras"),
        ("SGM Uniform", "sgm_uniform"),
        ("SGMUniform", "sgm_uniform"),
        ("Align Your Steps", "align_your_steps"),
        ("Uniform", "normal"),
        ("Normal", "normal"),
        ("DDIM", "ddim_uniform"),
        ("KL Optimal", "kl_optimal"),
        ("Polyexponential", "polyexponential"),
        ("Exponential", "exponential"),
        ("Simple", "simple"),
        ("Beta", "beta"),
    ],
)
def test_a1111_labels_resolve(registry: Registry, label: str, name: str) -> None:
    assert registry.scheduler(label).name == name
    assert registry.scheduler(label.lower()).name == name
