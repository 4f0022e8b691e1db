"""The UNet backbones' export specs: names are the backbone's parameters, sample inputs run, ranges are sane."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch
from sd_fixtures import TinySD, tiny_sd1

import latentrt
from latentrt.plugins.stable_diffusion.export import unet_export_spec
from latentrt.plugins.stable_diffusion.families_xl import SDXLBackbone
from latentrt.plugins.stable_diffusion.unet import SD1_UNET, SDXL_UNET, UNet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySD:
    return tiny_sd1(tmp_path_factory)


def test_sd1_spec_feeds_the_backbone_by_name(tiny: TinySD) -> None:
    backbone = latentrt.load(tiny.single_file, progress=False).model.denoiser.backbone  # type: ignore[attr-defined]
    spec = backbone.export_spec()
    assert spec.input_names == ("sample", "timestep", "context")
    assert set(spec.input_names) <= set(inspect.signature(backbone.__call__).parameters)
    assert spec.shape_range == {"batch": (1, 2, 8), "height": (256, 512, 1024), "width": (256, 512, 1024)}
    assert spec.dynamic_axes["sample"] == {0: "batch", 2: "height", 3: "width"}
    assert spec.sample_inputs is not None
    feeds = spec.sample_inputs({"batch": 2, "height": 64, "width": 96})
    with torch.no_grad():
        out = backbone(**feeds)
    assert out.shape == (2, 4, 8, 12)


def test_inpainting_and_sdxl_specs_declare_their_extra_inputs() -> None:
    inpaint = unet_export_spec(replace(SD1_UNET, in_channels=9))
    assert inpaint.input_names == ("sample", "timestep", "context", "c_concat")
    assert inpaint.sample_inputs is not None
    assert inpaint.sample_inputs({"batch": 1, "height": 64, "width": 64})["c_concat"].shape == (1, 5, 8, 8)
    base = unet_export_spec(SDXL_UNET, time_ids=6)
    assert base.input_names == ("sample", "timestep", "context", "text_embeds", "time_ids")
    assert base.shape_range["height"] == (512, 1024, 1536)
    assert base.sample_inputs is not None
    feeds = base.sample_inputs({"batch": 1, "height": 1024, "width": 1024})
    assert feeds["text_embeds"].shape == (1, 1280)  # 2816 - 6 * 256
    assert feeds["time_ids"].shape == (1, 6)
    assert feeds["context"].shape == (1, 77, 2048)
    with torch.device("meta"):
        backbone = SDXLBackbone(UNet(SDXL_UNET))
    assert set(backbone.export_spec().input_names) <= set(inspect.signature(backbone.__call__).parameters)
    with pytest.raises(ValueError, match="needs an SDXL UNet"):
        unet_export_spec(SD1_UNET, time_ids=6)
