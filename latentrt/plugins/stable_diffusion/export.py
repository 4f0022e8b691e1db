"""Export specs of the SD backbones (DESIGN.md section 4): names, dtypes, dynamic axes, shape range.

Input names are the backbone's own parameter names, so a runtime that feeds a compiled
module by name needs no per-model mapping: ``sample``, ``timestep``, ``context``, plus
``c_concat`` (inpainting UNets) and ``text_embeds`` / ``time_ids`` (SDXL). Heights and
widths in the shape range are in pixels; the latent is 1/8 of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from latentrt.core.protocols import ExportSpec
from latentrt.plugins.stable_diffusion.unet import UNetConfig

__all__ = ["SIZE_RANGES", "unet_export_spec"]

LATENT_SCALE = 8
SIZE_RANGES = {"sd": (256, 512, 1024), "sdxl": (512, 1024, 1536)}
"""Default (min, opt, max) pixel sizes a UNet export is built for."""


def _latent_axes() -> dict[int, str]:
    return {0: "batch", 2: "height", 3: "width"}


def unet_export_spec(
    config: UNetConfig,
    *,
    time_ids: int = 0,
    sizes: tuple[int, int, int] | None = None,
    batch: tuple[int, int, int] = (1, 2, 8),
    tokens: int = 77,
    latent_scale: int = LATENT_SCALE,
) -> ExportSpec:
    """The UNet backbone's contract: ``(sample, timestep, context[, c_concat][, text_embeds, time_ids])``.

    ``time_ids`` is how many size/aesthetic ids an SDXL UNet takes (base 6, refiner 5; 0
    for SD1/SD2): its vector input is the pooled text embedding plus 256 features per id.
    ``latent_scale`` is the VAE's downscale (pixels per latent; 8 for SD's VAE).
    """
    sdxl = time_ids > 0
    sizes = sizes or SIZE_RANGES["sdxl" if sdxl else "sd"]
    inputs = ["sample", "timestep", "context"]
    axes: dict[str, dict[int, str]] = {
        "sample": _latent_axes(),
        "timestep": {0: "batch"},
        "context": {0: "batch", 1: "tokens"},
    }
    extra_channels = config.in_channels - config.out_channels
    if extra_channels:
        inputs.append("c_concat")
        axes["c_concat"] = _latent_axes()
    pooled = 0
    if sdxl:
        if config.adm_in_channels is None:
            raise ValueError("time_ids > 0 needs an SDXL UNet (adm_in_channels is None)")
        pooled = config.adm_in_channels - time_ids * 256
        inputs += ["text_embeds", "time_ids"]
        axes.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})

    def sample_inputs(dims: Mapping[str, int]) -> dict[str, Tensor]:
        b, h, w = dims["batch"], dims["height"] // latent_scale, dims["width"] // latent_scale
        generator = torch.Generator().manual_seed(0)
        feeds = {
            "sample": torch.randn(b, config.out_channels, h, w, generator=generator),
            "timestep": torch.full((b,), 500.0),
            "context": torch.randn(b, tokens, config.context_dim, generator=generator),
        }
        if extra_channels:
            feeds["c_concat"] = torch.randn(b, extra_channels, h, w, generator=generator)
        if sdxl:
            feeds["text_embeds"] = torch.randn(b, pooled, generator=generator)
            ids = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0] if time_ids == 6 else [1024.0, 1024.0, 0.0, 0.0, 6.0]
            feeds["time_ids"] = torch.tensor([ids] * b)
        return feeds

    return ExportSpec(
        name="unet",
        input_names=tuple(inputs),
        output_names=("noise_pred",),
        input_dtypes={name: torch.float32 for name in inputs},
        dynamic_axes={**axes, "noise_pred": _latent_axes()},
        shape_range={"batch": batch, "height": sizes, "width": sizes},
        sample_inputs=sample_inputs,
        pixel_scale={name: latent_scale for name in ("sample", "c_concat", "noise_pred")},  # latent sides in pixels
    )
