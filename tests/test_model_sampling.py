"""The SD discrete schedule against diffusers' EulerDiscreteScheduler (the reference users trust)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from latentrt.core.model_sampling import sd_model_sampling


@pytest.fixture(scope="module")
def diffusers_euler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_sigma_table_matches_diffusers(diffusers_euler: EulerDiscreteScheduler) -> None:
    ours = sd_model_sampling()
    alphas_cumprod = diffusers_euler.alphas_cumprod.to(torch.float64)
    reference = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    # diffusers computes betas and their cumprod in float32; we (like ComfyUI) in float64,
    # then store float32. The float32 cumprod drifts by up to 1.3e-5 relative at t=0.
    torch.testing.assert_close(ours.sigmas.double(), reference, rtol=2e-5, atol=0)
    assert ours.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert ours.sigma_min == pytest.approx(0.0292, abs=1e-4)


def test_sigma_to_t_matches_diffusers(diffusers_euler: EulerDiscreteScheduler) -> None:
    ms = sd_model_sampling()
    log_sigmas = np.log(ms.sigmas.double().numpy())
    sigmas = torch.tensor([14.6, 9.0, 3.3, 1.0, 0.51, 0.1, 0.03], dtype=torch.float64)
    expected = [float(diffusers_euler._sigma_to_t(np.array(s), log_sigmas)) for s in sigmas.numpy()]
    assert ms.sigma_to_t(sigmas).tolist() == pytest.approx(expected, abs=1e-6)


def test_t_to_sigma_inverts_sigma_to_t_and_hits_table() -> None:
    ms = sd_model_sampling()
    t = torch.tensor([0.0, 1.5, 250.25, 999.0], dtype=torch.float64)
    torch.testing.assert_close(ms.sigma_to_t(ms.t_to_sigma(t)), t, atol=1e-6, rtol=0)
    integer_t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ms.t_to_sigma(integer_t), ms.sigmas[integer_t])


def test_sigma_to_t_clamps_outside_the_table() -> None:
    ms = sd_model_sampling()
    assert float(ms.sigma_to_t(torch.tensor(100.0))) == pytest.approx(999.0)
    assert float(ms.sigma_to_t(torch.tensor(0.001))) == pytest.approx(0.0)


def test_linspace_timesteps_sigmas_match_diffusers(diffusers_euler: EulerDiscreteScheduler) -> None:
    diffusers_euler.set_timesteps(10)
    ms = sd_model_sampling()
    ours = ms.t_to_sigma(diffusers_euler.timesteps.to(torch.float64))
    torch.testing.assert_close(ours.float(), diffusers_euler.sigmas[:-1], rtol=1e-5, atol=1e-6)
