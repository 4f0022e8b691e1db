"""Properties every built-in sampler must have, checked on the analytic Gaussian target.

The per-family files compare each sampler's numbers against k-diffusion or diffusers;
this file checks the contract for all of them at once: batch invariance, the target's
moments, dtype preservation, the noise requirement, callbacks and bad sigmas.
"""

from __future__ import annotations

import pytest
import torch

from latentrt.core.errors import InvalidRequest
from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.noise import noise_for_sampler
from latentrt.core.protocols import StepInfo
from latentrt.core.registry import SamplerSpec, build_registry
from latentrt.testing import (
    GaussianTarget,
    check_deterministic,
    check_gaussian_moments,
    check_preserves_tensor,
    check_signature,
    run_sampler,
)

BUILTIN = build_registry(autoload=False).samplers
ALL = sorted(BUILTIN)

REQUIRED = [
    "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
    "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddim",
    "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "uni_pc", "uni_pc_bh2", "res_multistep", "restart",
]  # fmt: skip

A1111_LABELS = {
    "Euler": "euler",
    "Euler a": "euler_ancestral",
    "LMS": "lms",
    "Heun": "heun",
    "DPM2": "dpm_2",
    "DPM2 a": "dpm_2_ancestral",
    "DPM++ 2S a": "dpmpp_2s_ancestral",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DPM fast": "dpm_fast",
    "DPM adaptive": "dpm_adaptive",
    "Restart": "restart",
    "DDIM": "ddim",
    "UniPC": "uni_pc",
    "LCM": "lcm",
}


def _spec(name: str) -> SamplerSpec:
    return BUILTIN[name]


def test_every_sampler_users_expect_is_registered() -> None:
    assert sorted(set(REQUIRED) - set(BUILTIN)) == []


@pytest.mark.parametrize(("label", "name"), sorted(A1111_LABELS.items()))
def test_a1111_labels_resolve(label: str, name: str) -> None:
    registry = build_registry(autoload=False)
    assert registry.sampler(label).name == name
    assert registry.sampler(label.upper()).name == name


@pytest.mark.parametrize("name", ALL)
def test_signature_follows_the_contract(name: str) -> None:
    check_signature(_spec(name).fn)


@pytest.mark.parametrize("name", ALL)
def test_batch_invariance_and_determinism(name: str) -> None:
    """Image k of a batch of 4 equals the same seed run alone; reruns are identical."""
    check_deterministic(_spec(name))


@pytest.mark.parametrize("name", ALL)
def test_samples_have_the_target_moments(name: str) -> None:
    """N(0.5, 0.6^2) data: mean and std of 8x32x32 samples within 0.04 after 80 Karras steps.

    lcm is a consistency-model sampler: it runs on the exact consistency function.
    """
    check_gaussian_moments(_spec(name), consistency_model=name == "lcm")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_shape_and_device_are_preserved(name: str, dtype: torch.dtype) -> None:
    check_preserves_tensor(_spec(name), dtype)


NOISE_SWITCHES = {"eta": 1.0, "s_churn": 1.0}
"""Options that turn on noise in samplers whose defaults draw none (ddim and dpm_fast: eta; euler: s_churn)."""


@pytest.mark.parametrize("name", [n for n in ALL if BUILTIN[n].noise != "none"])
def test_stochastic_samplers_demand_noise(name: str) -> None:
    """On a 20-step SD Karras schedule (restart only restarts on long enough schedules).

    Samplers whose defaults draw no noise run without a source, and demand one once an
    option turns noise on.
    """
    spec, target = _spec(name), GaussianTarget()
    sigmas = build_registry(autoload=False).scheduler("karras").sigmas(20, sd_model_sampling()).double()
    x = target.start((1, 1, 4, 4), float(sigmas[0]))
    switches = {k: v for k, v in NOISE_SWITCHES.items() if spec.options.get(k) == 0}
    if switches:
        assert torch.isfinite(spec.sample(target.denoiser(), x, sigmas, noise=None)).all()
    with pytest.raises(InvalidRequest, match="needs a noise source"):
        spec.sample(target.denoiser(), x, sigmas, noise=None, **switches)


@pytest.mark.parametrize("name", [n for n in ALL if BUILTIN[n].noise == "none"])
def test_deterministic_samplers_never_need_noise(name: str) -> None:
    target = GaussianTarget()
    sigmas = build_registry(autoload=False).scheduler("karras").sigmas(20, sd_model_sampling()).double()
    out = _spec(name).sample(target.denoiser(), target.start((1, 1, 4, 4), float(sigmas[0])), sigmas)
    assert torch.isfinite(out).all()


NOT_ONE_REPORT_PER_SIGMA = {
    "dpm_fast": "takes orders-3 steps, one report per step, fewer steps than sigmas",
    "dpm_adaptive": "adaptive: one report per attempted step",
    "restart": "adds restart steps to the schedule",
}


@pytest.mark.parametrize("name", ALL)
def test_callback_reports_every_step(name: str) -> None:
    """One StepInfo per step with the schedule's own sigmas (except where the method takes other steps)."""
    seen: list[StepInfo] = []
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.0], dtype=torch.float64)
    out = run_sampler(_spec(name), GaussianTarget(), sigmas, batch=2, callback=seen.append)
    assert seen, "callback never called"
    assert all(info.denoised.shape == out.shape and info.x.shape == out.shape for info in seen)
    if name in NOT_ONE_REPORT_PER_SIGMA:
        assert [info.i for info in seen] == list(range(len(seen)))
        assert all(float(info.sigma) > 0 for info in seen)
        return
    assert [info.i for info in seen] == list(range(len(sigmas) - 1))
    assert [float(info.sigma_next) for info in seen] == sigmas[1:].tolist()


class _CondSpy:
    """A Gaussian denoiser that records the conditioning it is handed."""

    def __init__(self) -> None:
        self.inner = GaussianTarget().denoiser()
        self.model_sampling = self.inner.model_sampling
        self.conds: list[object] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
        self.conds.append(cond)
        return self.inner(x, sigma, None)


@pytest.mark.parametrize("name", ALL)
def test_conditioning_reaches_every_denoiser_call(name: str) -> None:
    spec, target, spy, cond = _spec(name), GaussianTarget(), _CondSpy(), object()
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=torch.float64)
    x = target.start((2, 1, 4, 4), 10.0)
    spec.sample(spy, x, sigmas, cond=cond, noise=noise_for_sampler(spec.noise, x, sigmas, [1, 2]))  # type: ignore[arg-type]
    assert spy.conds and all(c is cond for c in spy.conds)


@pytest.mark.parametrize("name", ALL)
def test_one_step_schedule(name: str) -> None:
    """``[sigma_max, 0]``: every sampler lands on the denoised estimate of its input (one model call
    and a first-order step to 0), Brownian noise included."""
    spec, target = _spec(name), GaussianTarget()
    sigmas = torch.tensor([14.6, 0.0], dtype=torch.float64)
    x = target.start((2, 1, 4, 4), 14.6)
    out = spec.sample(target.denoiser(), x, sigmas, noise=noise_for_sampler(spec.noise, x, sigmas, [1, 2]))
    expected = target.denoiser()(x, torch.full([2], 14.6, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("x_dtype", "sigma_dtype"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)],
)
def test_sigma_dtype_never_promotes_the_latent(name: str, x_dtype: torch.dtype, sigma_dtype: torch.dtype) -> None:
    """A float32 network must keep receiving float32 latents even when the schedule is float64, and
    fp16/bf16 latents stay fp16/bf16 under float32 sigmas."""
    spec, target = _spec(name), GaussianTarget()
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0], dtype=sigma_dtype)
    x = target.start((2, 1, 4, 4), 10.0, dtype=x_dtype)
    seen: list[torch.dtype] = []

    def denoiser(x_in: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
        seen.append(x_in.dtype)
        return target.denoiser()(x_in, sigma, None)

    denoiser.model_sampling = target.denoiser().model_sampling  # type: ignore[attr-defined]
    out = spec.sample(denoiser, x, sigmas, noise=noise_for_sampler(spec.noise, x, sigmas, [1, 2]))  # type: ignore[arg-type]
    assert out.dtype == x_dtype
    assert set(seen) == {x_dtype}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        ([10.0, 12.0, 0.0], "strictly decreasing"),
        ([10.0, 1.0, 0.5], "end with 0"),
        ([10.0, float("nan"), 0.0], "finite"),
        ([10.0], "at least 2"),
    ],
)
def test_bad_sigmas_are_refused(name: str, sigmas: list[float], message: str) -> None:
    target = GaussianTarget()
    x = target.start((1, 1, 4, 4), 10.0)
    with pytest.raises(InvalidRequest, match=message):
        _spec(name).sample(target.denoiser(), x, torch.tensor(sigmas, dtype=torch.float64))


def test_unknown_option_is_refused_with_the_valid_ones() -> None:
    target = GaussianTarget()
    sigmas = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    with pytest.raises(InvalidRequest, match=r"does not take option.*etaa.*it takes: s_churn"):
        _spec("euler").sample(target.denoiser(), target.start((1, 1, 2, 2), 10.0), sigmas, etaa=1.0)
