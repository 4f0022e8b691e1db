"""Load k-diffusion's ``sampling.py`` as the reference for sampler and schedule formulas.

The ``k-diffusion`` package imports torchvision, wandb and more at package level; its
sampling module needs only scipy, torchsde, torchdiffeq and ``utils.append_dims``. We
load that one file under a stub parent package so the test environment stays small.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch


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
