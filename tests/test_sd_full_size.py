"""Full-size SD 1.5 and SDXL single files (random weights, real LDM names) load with nothing missing or extra.

Slow (writes a 2 GB and a 6.9 GB fp16 file): runs in ``make test-all``. Parameter counts on the
``meta`` device are checked quickly elsewhere: the SDXL UNet in ``test_sd_unet``
(``test_full_size_on_meta``), bigG in ``test_sd_clip`` (``test_full_size_parameter_counts``), the
SDXL file's names in ``test_sdxl`` (``test_full_size_sdxl_names_on_meta``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from full_size import sd15_shapes, sdxl_shapes, write_random_sd15, write_random_sdxl

import latentrt
from latentrt.plugins.stable_diffusion.clip import CLIP_VIT_L, OPENCLIP_VIT_BIGG
from latentrt.plugins.stable_diffusion.unet import SD1_UNET, SDXL_UNET

pytestmark = pytest.mark.slow


def test_full_size_sd15_file_loads_strictly(tmp_path: Path) -> None:
    path = write_random_sd15(tmp_path / "sd15-random.safetensors", dtype=torch.float16)
    pipe = latentrt.load(path, dtype="fp32", progress=False)
    unet = pipe.model.denoiser.backbone.unet  # type: ignore[attr-defined]
    assert unet.config == SD1_UNET
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in pipe.model.vae.parameters()) == 83_653_863  # type: ignore[attr-defined]
    assert len(sd15_shapes()) == 686 + 248 + 196


def test_full_size_sdxl_file_loads_strictly(tmp_path: Path) -> None:
    """Every network tensor of the file is read (a missing or unexpected one is a CheckpointError), the
    shapes give SDXL base's configs, and the parameter counts are SDXL's. Loaded in fp16: about
    7 GB of memory besides the memory-mapped file."""
    path = write_random_sdxl(tmp_path / "sdxl-random.safetensors", dtype=torch.float16)
    try:
        pipe = latentrt.load(path, dtype="fp16", progress=False)
    finally:
        path.unlink()  # 6.9 GB: not left behind in pytest's kept temporary directories (memory maps stay valid)
    model: Any = pipe.model
    assert model.family == "sdxl" and model.default_size == 1024
    unet = model.denoiser.backbone.unet
    assert unet.config == SDXL_UNET
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    clip_l, big_g = (branch.model for branch in model.text_encoder.branches)
    assert clip_l.config == CLIP_VIT_L and big_g.config == OPENCLIP_VIT_BIGG
    assert sum(p.numel() for p in big_g.parameters()) == 694_659_840  # with the 1280 x 1280 projection
    assert sum(p.numel() for p in clip_l.parameters()) == 123_060_480
    assert sum(p.numel() for p in model.vae.parameters()) == 83_653_863
    assert model.text_encoder.context_dim == 2048
    assert len(sdxl_shapes()) == 1680 + 248 + 196 + 6 + 32 * 12  # UNet, VAE, CLIP-L, bigG
