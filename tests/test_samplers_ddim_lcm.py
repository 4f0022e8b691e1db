"""DDIM, DDPM and LCM against diffusers' schedulers and k-diffusion's Euler samplers (float64, tolerance 1e-5).

diffusers works in VP coordinates with an eps model at discrete timesteps. We drive both from the exact
Gaussian denoiser: at timestep t, ``sigma_t = sqrt((1 - a_t) / a_t)``, ``x_ve = x_vp * sqrt(1 + sigma_t^2)``
and ``eps = (x_ve - D(x_ve, sigma_t)) / sigma_t``; our samplers get the same sigmas plus a final 0 and start
from ``x_ve``. The final VP latent at alpha = 1 is the VE latent. The schedulers' float32 alpha tables are
cast to float64 so both sides do float64 arithmetic on identical sigmas.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.noise import GaussianNoise
from latentrt.core.registry import Registry
from latentrt.testing import GaussianTarget, check_gaussian_moments, check_sampler, convergence_order

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
TARGET = GaussianTarget(mu=0.3, s=0.7)
SEEDS = [3, 4]


def _sigma(alpha_bar: Tensor) -> float:
    return math.sqrt((1 - float(alpha_bar)) / float(alpha_bar))


def _eps(x_vp: Tensor, sigma: float) -> Tensor:
    """The eps prediction the exact Gaussian denoiser implies at VE noise level ``sigma``."""
    x_ve = x_vp * math.sqrt(1 + sigma**2)
    denoised = TARGET.denoiser()(x_ve, torch.full([x_vp.shape[0]], sigma, dtype=x_vp.dtype))
    return (x_ve - denoised) / sigma


def _start(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_ve, x_vp)`` at ``sigmas[0]``."""
    x_ve = TARGET.start((2, 4, 8, 8), float(sigmas[0]), seed=11)
    return x_ve, x_ve / math.sqrt(1 + float(sigmas[0]) ** 2)


def _stream(x: Tensor) -> Callable[..., Tensor]:
    """A randn replacement for diffusers that returns the draws GaussianNoise(SEEDS) gives our samplers."""
    noise = GaussianNoise.from_seeds(x, SEEDS)
    return lambda *args, **kwargs: noise(torch.tensor(0.0), torch.tensor(0.0))


def _float64_table(scheduler: object) -> list[int]:
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # type: ignore[attr-defined]
    return [int(t) for t in scheduler.timesteps]  # type: ignore[attr-defined]


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers(registry: Registry, eta: float) -> None:
    scheduler = diffusers.DDIMScheduler(
        **SD_BETAS, set_alpha_to_one=True, clip_sample=False, steps_offset=1, timestep_spacing="leading"
    )
    scheduler.set_timesteps(10)
    timesteps = _float64_table(scheduler)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sigmas = torch.tensor([_sigma(scheduler.alphas_cumprod[t]) for t in timesteps] + [0.0], dtype=torch.float64)
    x_ve, x_vp = _start(sigmas)
    draw = _stream(x_ve)
    for i, t in enumerate(timesteps):
        x_vp = scheduler.step(_eps(x_vp, float(sigmas[i])), t, x_vp, eta=eta, variance_noise=draw()).prev_sample
    noise = GaussianNoise.from_seeds(x_ve, SEEDS) if eta > 0 else None
    ours = registry.sampler("DDIM").sample(TARGET.denoiser(), x_ve.clone(), sigmas, noise=noise, eta=eta)
    assert (ours - x_vp).abs().max() < TOL


def _karras_sigmas() -> Tensor:
    return torch.tensor([14.6, 7.0, 3.1, 1.2, 0.5, 0.1, 0.0], dtype=torch.float64)


def test_deterministic_ddim_is_euler(registry: Registry) -> None:
    sigmas = _karras_sigmas()
    x = TARGET.start((2, 4, 8, 8), float(sigmas[0]))
    ddim = registry.sampler("ddim").sample(TARGET.denoiser(), x.clone(), sigmas)
    euler = registry.sampler("euler").sample(TARGET.denoiser(), x.clone(), sigmas)
    assert (ddim - euler).abs().max() < 1e-12


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_ddim_eta_noise_is_the_ancestral_split(registry: Registry, eta: float) -> None:
    """DDIM's sigma_t(eta) in VE coordinates is k-diffusion's sigma_up: DDIM(eta) == Euler ancestral(eta)."""
    sigmas = _karras_sigmas()
    x = TARGET.start((2, 4, 8, 8), float(sigmas[0]))
    runs = [
        registry.sampler(name).sample(
            TARGET.denoiser(), x.clone(), sigmas, noise=GaussianNoise.from_seeds(x, SEEDS), eta=eta
        )
        for name in ("ddim", "euler_ancestral")
    ]
    assert (runs[0] - runs[1]).abs().max() < 1e-12


def test_ddim_needs_noise_only_with_eta(registry: Registry) -> None:
    sigmas, spec = _karras_sigmas(), registry.sampler("ddim")
    x = TARGET.start((1, 4, 8, 8), float(sigmas[0]))
    spec.sample(TARGET.denoiser(), x, sigmas)
    with pytest.raises(InvalidRequest, match="ddim"):
        spec.sample(TARGET.denoiser(), x, sigmas, eta=0.5)


def test_ddpm_matches_diffusers(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = diffusers.DDPMScheduler(**SD_BETAS, clip_sample=False, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(10)
    timesteps = _float64_table(scheduler)
    sigmas = torch.tensor([_sigma(scheduler.alphas_cumprod[t]) for t in timesteps] + [0.0], dtype=torch.float64)
    x_ve, x_vp = _start(sigmas)
    # diffusers draws its posterior noise with randn_tensor: feed it our noise stream (it also draws at
    # the last step, where its variance is clamped to 1e-20, so that draw changes nothing)
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", _stream(x_ve))
    for i, t in enumerate(timesteps):
        x_vp = scheduler.step(_eps(x_vp, float(sigmas[i])), t, x_vp).prev_sample
    noise = GaussianNoise.from_seeds(x_ve, SEEDS)
    ours = registry.sampler("DDPM").sample(TARGET.denoiser(), x_ve.clone(), sigmas, noise=noise)
    assert (ours - x_vp).abs().max() < TOL


class _LCMDenoiser:
    """An LCM-parameterized denoiser: diffusers' boundary condition ``c_out * x0 + c_skip * x_vp`` on top
    of the exact Gaussian denoiser, at the LCM timestep of each sigma. In latentrt (as in ComfyUI's ``lcm``
    model sampling) this condition belongs to the model adapter; ComfyUI applies ``c_skip`` to the VE
    latent, which differs from diffusers by ``c_skip * (x_ve - x_vp)``, below 1e-7 at LCM's timesteps."""

    def __init__(self, sigmas: Tensor, timesteps: list[int]) -> None:
        self.sigmas, self.timesteps = sigmas, timesteps
        self.model_sampling = TARGET.denoiser().model_sampling

    def __call__(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        sigma0 = float(sigma[0])
        t = self.timesteps[int((self.sigmas - sigma0).abs().argmin())] * 10.0  # timestep_scaling = 10
        c_skip, c_out = 0.25 / (t**2 + 0.25), t / (t**2 + 0.25) ** 0.5  # sigma_data = 0.5
        return c_out * TARGET.denoiser()(x, sigma) + c_skip * x / math.sqrt(1 + sigma0**2)


def test_lcm_matches_diffusers(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = diffusers.LCMScheduler(**SD_BETAS)
    scheduler.set_timesteps(4)
    timesteps = _float64_table(scheduler)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sigmas = torch.tensor([_sigma(scheduler.alphas_cumprod[t]) for t in timesteps] + [0.0], dtype=torch.float64)
    denoiser = _LCMDenoiser(sigmas, timesteps)
    x_ve, x_vp = _start(sigmas)
    monkeypatch.setattr("diffusers.schedulers.scheduling_lcm.randn_tensor", _stream(x_ve))
    for i, t in enumerate(timesteps):  # LCMScheduler applies the boundary condition itself: plain eps in
        x_vp = scheduler.step(_eps(x_vp, float(sigmas[i])), t, x_vp).prev_sample
    ours = registry.sampler("LCM").sample(denoiser, x_ve.clone(), sigmas, noise=GaussianNoise.from_seeds(x_ve, SEEDS))
    assert (ours - x_vp).abs().max() < TOL


def test_lcm_samples_the_target_with_a_consistency_model(registry: Registry) -> None:
    """check_sampler's default moment check drives samplers with the MMSE denoiser, which is not a
    consistency model: LCM then shrinks the variance at every jump (std 0.41 instead of 0.6). With
    the exact consistency function LCM samples the target exactly."""
    spec = registry.sampler("lcm")
    check_sampler(spec, consistency_model=True)
    sigmas = torch.tensor([14.6, 4.0, 1.0, 0.2, 0.0], dtype=torch.float64)
    x = TARGET.start((8, 1, 32, 32), float(sigmas[0]), seed=5)
    out = spec.sample(TARGET.consistency_function(), x, sigmas, noise=GaussianNoise.from_seeds(x, list(range(8))))
    assert float(out.mean()) == pytest.approx(TARGET.mu, abs=0.02)
    assert float(out.std()) == pytest.approx(TARGET.s, abs=0.02)
    with pytest.raises(AssertionError, match="std"):
        check_gaussian_moments(spec)


def test_ddim_is_first_order(registry: Registry) -> None:
    assert convergence_order(registry.sampler("ddim")) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_conformance(registry: Registry, name: str) -> None:
    check_sampler(registry.sampler(name))


def test_registration(registry: Registry) -> None:
    assert {registry.sampler(label).name for label in ("DDIM", "DDPM", "LCM")} == {"ddim", "ddpm", "lcm"}
    assert {registry.sampler(name).noise for name in ("ddim", "ddpm", "lcm")} == {"gaussian"}
