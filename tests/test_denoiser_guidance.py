"""Model parameterization (eps / v) and classifier-free guidance."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from latentrt.core.denoiser import DiscreteDenoiser
from latentrt.core.errors import InvalidRequest
from latentrt.core.guidance import CFGDenoiser
from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.protocols import Conditioning
from latentrt.testing import GaussianTarget

MS = sd_model_sampling()


def _noisy(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    return x0, eps, torch.tensor([7.5, 0.4], dtype=torch.float64)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_discrete_denoiser_recovers_x0_from_a_perfect_backbone(prediction: str) -> None:
    """A backbone that knows x0 and eps returns eps, or v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    x0, eps, sigma = _noisy()
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    alpha_bar = (1 / (1 + sigma**2)).view(-1, 1, 1, 1)
    seen: dict[str, Tensor] = {}

    def backbone(sample: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        seen.update(sample=sample, timestep=timestep, context=context)
        return eps if prediction == "eps" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0

    context = torch.zeros(2, 77, 8)
    out = DiscreteDenoiser(backbone, MS, prediction)(x, sigma, Conditioning(context))  # type: ignore[arg-type]
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    # the backbone sees the VP-scaled input x / sqrt(sigma^2 + 1) at the continuous timestep
    torch.testing.assert_close(seen["sample"], x * alpha_bar.sqrt(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["timestep"], MS.sigma_to_t(sigma.float()))
    assert seen["context"] is context


def test_discrete_denoiser_forwards_extra_conditioning() -> None:
    seen: dict[str, Tensor] = {}

    def backbone(sample: Tensor, timestep: Tensor, context: Tensor, y: Tensor) -> Tensor:
        seen["y"] = y
        return torch.zeros_like(sample)

    cond = Conditioning(torch.zeros(1, 77, 8), extra={"y": torch.ones(1, 16)})
    DiscreteDenoiser(backbone, MS)(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), cond)
    assert torch.equal(seen["y"], torch.ones(1, 16))


def test_discrete_denoiser_bad_input() -> None:
    with pytest.raises(InvalidRequest, match="prediction must be 'eps' or 'v'"):
        DiscreteDenoiser(lambda *a: a[0], MS, "x0")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="needs conditioning"):
        DiscreteDenoiser(lambda *a: a[0], MS)(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), None)


class _TwoTargets:
    """Exact denoisers of N(mu, s^2) with mu read from the conditioning; counts calls and batch sizes."""

    def __init__(self) -> None:
        self.model_sampling = MS
        self.batches: list[int] = []

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None) -> Tensor:
        assert cond is not None
        self.batches.append(x.shape[0])
        mu = cond.context[:, 0, 0].view(-1, 1, 1, 1).to(x.dtype)
        s2, sig2 = 0.36, sigma.view(-1, 1, 1, 1).to(x.dtype) ** 2
        return (s2 * x + sig2 * mu) / (s2 + sig2)


def _conds(mus: list[float]) -> Conditioning:
    return Conditioning(torch.tensor(mus, dtype=torch.float64).view(-1, 1, 1).expand(-1, 77, 8).contiguous())


def test_cfg_combines_per_image_scales_in_one_batched_call() -> None:
    inner = _TwoTargets()
    cond, uncond = _conds([1.0, -0.5]), _conds([0.0, 0.2])
    scale = torch.tensor([7.0, 1.0], dtype=torch.float64)
    guided = CFGDenoiser(inner, cond, uncond, scale)
    x, sigma = GaussianTarget().start((2, 4, 8, 8), 3.0), torch.tensor([3.0, 3.0], dtype=torch.float64)
    out = guided(x, sigma)
    x0_c, x0_u = inner(x, sigma, cond), inner(x, sigma, uncond)
    expected = x0_u + scale.view(-1, 1, 1, 1) * (x0_c - x0_u)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert inner.batches[0] == 4  # one backbone call for [cond; uncond]
    assert guided.model_sampling is MS


def test_cfg_without_negative_runs_the_conditional_only() -> None:
    inner = _TwoTargets()
    x, sigma = torch.zeros(1, 4, 8, 8, dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    out = CFGDenoiser(inner, _conds([1.0]), None, torch.tensor([7.0]))(x, sigma)
    torch.testing.assert_close(out, inner(x, sigma, _conds([1.0])))
    assert inner.batches == [1, 1]


def test_guidance_rescale_matches_diffusers() -> None:
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    inner = _TwoTargets()
    cond, uncond = _conds([1.0, 0.3]), _conds([0.0, -0.4])
    x, sigma = GaussianTarget().start((2, 4, 8, 8), 2.0), torch.tensor([2.0, 2.0], dtype=torch.float64)
    out = CFGDenoiser(inner, cond, uncond, torch.tensor([7.5, 7.5]), torch.tensor([0.7, 0.7]))(x, sigma)
    s = sigma.view(-1, 1, 1, 1)
    eps_c, eps_u = (x - inner(x, sigma, cond)) / s, (x - inner(x, sigma, uncond)) / s
    eps_ref = rescale_noise_cfg(eps_u + 7.5 * (eps_c - eps_u), eps_c, guidance_rescale=0.7)
    torch.testing.assert_close(out, x - s * eps_ref, rtol=0, atol=1e-10)


def test_cfg_bad_shapes() -> None:
    with pytest.raises(InvalidRequest, match="negative conditioning has batch 1"):
        CFGDenoiser(_TwoTargets(), _conds([1.0, 2.0]), _conds([0.0]), torch.tensor([7.0, 7.0]))
    with pytest.raises(InvalidRequest, match="one value per image"):
        CFGDenoiser(_TwoTargets(), _conds([1.0, 2.0]), _conds([0.0, 0.0]), torch.tensor(7.0))
