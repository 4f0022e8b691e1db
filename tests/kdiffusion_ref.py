"""Load k-diffusion's ``sampling.py`` as the reference for sampler and schedule formulas.

The ``k-diffusion`` package imports torchvision, wandb and more at package level; its
sampling module needs only scipy, torchsde, torchdiffeq and ``utils.append_dims``. We
load that one file under a stub parent package so the test environment stays small.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from latentrt.testing import GaussianTarget


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load_kdiffusion_sampling() -> types.ModuleType:
    """The module ``k_diffusion.sampling``, or skip when k-diffusion is not installed."""
    if "kdiff_ref.sampling" in sys.modules:
        return sys.modules["kdiff_ref.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (make test installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    package = types.ModuleType("kdiff_ref")
    package.__path__ = []
    utils = types.ModuleType("kdiff_ref.utils")
    utils.append_dims = _append_dims  # type: ignore[attr-defined]
    package.utils = utils  # type: ignore[attr-defined]
    sys.modules["kdiff_ref"] = package
    sys.modules["kdiff_ref.utils"] = utils
    module_spec = importlib.util.spec_from_file_location("kdiff_ref.sampling", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["kdiff_ref.sampling"] = module
    module_spec.loader.exec_module(module)
    return module


PARITY_SIGMAS = (14.6, 7.0, 3.1, 1.2, 0.5, 0.1, 0.0)
"""A short, uneven schedule from SD's sigma_max to 0, shared by the parity tests."""


def parity_setup(seed: int = 0, batch: int = 2) -> tuple[GaussianTarget, torch.Tensor, torch.Tensor]:
    """The Gaussian target N(0.3, 0.7^2), :data:`PARITY_SIGMAS` (float64), and a [batch, 4, 8, 8]
    latent drawn from the exact marginal at the first sigma."""
    target = GaussianTarget(mu=0.3, s=0.7)
    sigmas = torch.tensor(PARITY_SIGMAS, dtype=torch.float64)
    return target, sigmas, target.start((batch, 4, 8, 8), float(sigmas[0]), seed=seed)


def kdiff_model(target: GaussianTarget) -> Callable[..., torch.Tensor]:
    """The target's exact denoiser behind k-diffusion's ``model(x, sigma, **extra_args)`` call."""
    denoiser = target.denoiser()
    return lambda x, sigma, **_: denoiser(x, sigma, None)
