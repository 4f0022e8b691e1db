"""Conformance tests of the example sampler, written the way a plugin author would.

``latentrt_check_sampler`` is a pytest fixture latentrt provides (through its ``pytest11``
entry point, so no conftest is needed). Run with the plugin installed::

    pip install -e . && pytest
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from latentrt_example_sampler import sample_euler_midpoint

import latentrt
from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.protocols import Conditioning, ModelSampling, StepInfo
from latentrt.testing import GaussianTarget, convergence_order


def test_registered_through_the_entry_point() -> None:
    spec = latentrt.registry(reload=True).sampler("Euler Midpoint")
    assert spec.name == "euler_midpoint"
    assert spec.plugin == "example_sampler"
    assert spec.fn is sample_euler_midpoint


def test_conformance_by_name(latentrt_check_sampler: Callable[..., None]) -> None:
    latentrt_check_sampler("euler_midpoint")


def test_conformance_of_the_function(latentrt_check_sampler: Callable[..., None]) -> None:
    latentrt_check_sampler(sample_euler_midpoint)


def test_at_least_second_order_on_the_gaussian_target() -> None:
    # The midpoint method is second order in general, but on the Gaussian target's ODE,
    # dy/dsigma = y * sigma / (s^2 + sigma^2), its h^3 local error term vanishes and it
    # converges at order ~3 (Heun stays at ~2 there). Hence a lower bound, and the check below.
    assert convergence_order(sample_euler_midpoint) > 1.8


class NonlinearDenoiser:
    """A made-up denoiser whose ODE is nonlinear in x (no closed-form solution)."""

    model_sampling: ModelSampling = sd_model_sampling()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        out: torch.Tensor = 0.8 * torch.tanh(x) / (1 + 0.3 * s**2) + 0.1 * torch.sin(3 * x)
        return out


def test_second_order_on_a_nonlinear_ode() -> None:
    def karras(n: int) -> torch.Tensor:  # n sigmas from 10 down to 0.1 (no final step to 0)
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        sigmas: torch.Tensor = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
        return sigmas

    x = torch.linspace(-15, 15, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    denoiser = NonlinearDenoiser()
    reference = sample_euler_midpoint(denoiser, x, karras(4096))
    errors = [(sample_euler_midpoint(denoiser, x, karras(n)) - reference).abs().max() for n in (64, 128)]
    assert math.log2(float(errors[0] / errors[1])) == pytest.approx(2.0, abs=0.25)


def test_exact_on_the_gaussian_target_with_many_steps() -> None:
    target = GaussianTarget()
    sigmas = torch.cat([torch.linspace(10.0, 0.1, 200, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = target.start((2, 1, 4, 4), 10.0, seed=3)
    steps: list[StepInfo] = []
    out = latentrt.registry().sampler("euler_midpoint").sample(target.denoiser(), x, sigmas, callback=steps.append)
    # the final Euler step to 0 returns D(x, 0.1); compare with the exact ODE solution there
    expected = target.denoiser()(target.ode_solution(x, 10.0, 0.1), torch.full((2,), 0.1, dtype=torch.float64))
    assert torch.allclose(out, expected, atol=1e-4)
    assert [s.i for s in steps] == list(range(200))
