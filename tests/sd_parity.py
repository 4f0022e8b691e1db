"""What the SD parity and loading tests share: the comparison settings, the run record,
and the checks that two runs or two loaded models agree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentrt.core.pipeline import Pipeline

WIDTH, HEIGHT = 96, 64  # latent 12 x 8 with the tiny VAE's downscale of 8 (not square: catches transposes)
SEEDS = [1234, 1235]
PIXEL_TOL = 1  # uint8 levels
# Final latents (std 1.3 to 21): measured max abs differences 1e-5 to 1.6e-4 (ancestral, 9-channel
# inpainting, resized inputs, SDXL refiner handoff); float32 summation order differs ([cond; uncond]
# vs diffusers' [uncond; cond], CFG applied to eps recovered from x0, a float64 vs float32 sigma table).
LATENT_TOL = 1e-3


@dataclass(frozen=True)
class Run:
    """Decoded images as one ``[batch, height, width, 3]`` uint8 array, and the final latents."""

    images: np.ndarray[Any, np.dtype[np.uint8]]
    latents: Tensor


def pixel_diff(a: Run, b: Run) -> int:
    """Largest difference between the two runs' pixels, in uint8 levels."""
    return int(np.abs(a.images.astype(np.int16) - b.images.astype(np.int16)).max())


def latent_diff(a: Run, b: Run) -> float:
    """Largest absolute difference between the two runs' final latents."""
    return float((a.latents.float() - b.latents.float()).abs().max())


def assert_same(reference: Run, got: Run) -> None:
    """Images within 1/255, latents within LATENT_TOL, and the reference not trivial."""
    assert got.images.shape == reference.images.shape == (len(SEEDS), HEIGHT, WIDTH, 3)
    saturated = float(np.isin(reference.images, (0, 255)).mean())
    assert saturated < 0.05, f"{saturated:.0%} of the reference pixels are clipped: the comparison would be weak"
    assert reference.images.std() > 10
    assert not np.array_equal(reference.images[0], reference.images[1])  # the two seeds differ
    pixels, latents = pixel_diff(reference, got), latent_diff(reference, got)
    assert pixels <= PIXEL_TOL and latents <= LATENT_TOL, f"max pixel diff {pixels}, max latent diff {latents:.2e}"


def states(pipeline: Pipeline) -> dict[str, dict[str, Tensor]]:
    """Our loaded UNet, VAE and text encoder(s) state dicts (SDXL: one entry per text branch)."""
    model: Any = pipeline.model
    parts = {"unet": model.denoiser.backbone.unet.state_dict(), "vae": model.vae.state_dict()}
    branches = getattr(model.text_encoder, "branches", None)
    if branches is None:
        parts["text"] = model.text_encoder.model.state_dict()
    else:
        parts.update({f"text{index}": branch.model.state_dict() for index, branch in enumerate(branches)})
    return parts


def assert_identical(a: dict[str, Tensor], b: dict[str, Tensor], what: str) -> None:
    """Same names, dtypes and values (shapes compared after reshaping)."""
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k].reshape(a[k].shape))]
    assert not different, f"{what}: {len(different)} tensors differ, first {different[:5]}"
