"""Channels-last weights: the tiny SD1 UNet and VAE give the default format's outputs (1e-5)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from onnx_fixtures import LIMITS
from sd_fixtures import tiny_sd1

import latentrt
from latentrt.plugins.stable_diffusion.vae import AutoencoderKL
from latentrt.runtimes.memory_format import is_channels_last, to_channels_last

# float32 on the CPU: NHWC and NCHW convolutions sum in different orders (measured up to ~1e-6 here)
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unet_and_vae_outputs_match_the_default_format(tmp_path_factory: pytest.TempPathFactory) -> None:
    pipe = latentrt.load(tiny_sd1(tmp_path_factory).single_file, progress=False)
    backbone = pipe.model.denoiser.backbone  # type: ignore[attr-defined]
    vae = pipe.model.vae
    assert isinstance(vae, AutoencoderKL)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 12, generator=generator)
    timestep = torch.tensor([999.0, 10.0])
    context = torch.randn(2, 77, backbone.unet.config.context_dim, generator=generator)
    with torch.inference_mode():
        unet_default = backbone(sample, timestep, context)
        images_default = vae.decode(sample[:1])
        latent_default = vae.encode(images_default)
        to_channels_last(backbone.unet)
        to_channels_last(vae)
        assert is_channels_last(backbone.unet) and is_channels_last(vae)
        unet_nhwc = backbone(sample, timestep, context)
        images_nhwc = vae.decode(sample[:1])
        latent_nhwc = vae.encode(images_default)
    assert float((unet_nhwc - unet_default).abs().max()) <= TOL
    assert float((images_nhwc - images_default).abs().max()) <= TOL
    assert float((latent_nhwc - latent_default).abs().max()) <= TOL


def test_to_channels_last_keeps_values_and_returns_the_module() -> None:
    conv = torch.nn.Conv2d(3, 5, 3)
    before = copy.deepcopy(conv.weight.detach())
    assert not is_channels_last(conv) and to_channels_last(conv) is conv
    assert is_channels_last(conv) and torch.equal(conv.weight.detach(), before)
    assert not is_channels_last(torch.nn.Linear(2, 2))  # nothing 4-D to convert


def test_channels_last_runtime_pipeline_matches_native(tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny = tiny_sd1(tmp_path_factory)
    native = latentrt.load(tiny.single_file, progress=False)
    nhwc = latentrt.load(tiny.single_file, progress=False, runtime={"unet": "torch_channels_last"}, limits=LIMITS)
    assert is_channels_last(nhwc.model.denoiser.backbone.compiled.module)  # type: ignore[attr-defined]
    request: dict[str, Any] = {"prompt": "a red cube", "steps": 3, "seed": 5, "width": 64, "height": 64}
    expected, got = native(**request).latents, nhwc(**request).latents
    # three steps compound the per-call rounding; relative to the latents' size (~30 for this tiny
    # random model) it stays within TOL (measured 1.3e-4 absolute, 4.7e-6 relative)
    assert float((expected - got).abs().max()) <= TOL * float(expected.abs().max())
