"""A full-size SD 1.5 single file (random weights, real LDM names) loads with nothing missing or extra.

Slow (writes a 2 GB fp16 file): runs in ``make test-all``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from full_size import sd15_shapes, write_random_sd15

import latentrt
from latentrt.plugins.stable_diffusion.unet import SD1_UNET

pytestmark = pytest.mark.slow


def test_full_size_sd15_file_loads_strictly(tmp_path: Path) -> None:
    path = write_random_sd15(tmp_path / "sd15-random.safetensors", dtype=torch.float16)
    pipe = latentrt.load(path, dtype="fp32", progress=False)
    unet = pipe.model.denoiser.backbone.unet  # type: ignore[attr-defined]
    assert unet.config == SD1_UNET
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in pipe.model.vae.parameters()) == 83_653_863  # type: ignore[attr-defined]
    assert len(sd15_shapes()) == 686 + 248 + 196
