"""Shared fixtures."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kdiffusion_ref import load_kdiffusion_sampling

import latentrt
from latentrt.core.registry import Registry, reset_registry


@pytest.fixture(scope="session")
def kdiff() -> types.ModuleType:
    """k-diffusion's sampling module (the reference for k-sampler formulas)."""
    return load_kdiffusion_sampling()


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``$LATENTRT_CACHE`` at a temporary folder for the whole run, so tests never read
    or write the user's engine cache and hash memo."""
    import os

    old = os.environ.get("LATENTRT_CACHE")
    path = tmp_path_factory.mktemp("latentrt-cache")
    os.environ["LATENTRT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LATENTRT_CACHE", None)
    else:
        os.environ["LATENTRT_CACHE"] = old


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test: tiny models gain nothing from intra-op threads and
    lose a lot on a busy machine (use with ``pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def registry() -> Iterator[Registry]:
    """The built-in registry, loaded fresh for the test."""
    reset_registry()
    yield latentrt.registry()
    reset_registry()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests cleanly where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
