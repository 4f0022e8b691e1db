"""A sampler demo that needs no weights: the exact denoiser of a tiny image set.

For data that is a finite set of images ``y_1..y_n`` (equal weights), the optimal
denoiser is the posterior mean (Karras et al. 2022, eq. 57 in the appendix; Tweedie's
formula): ``D(x, sigma) = sum_i w_i(x) y_i`` with
``w = softmax(-||x - y_i||^2 / (2 sigma^2))``. Sampling with it from pure noise must
land on one of the images, so any sampler bug shows as a smeared or wrong picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from latentrt.core.model_sampling import DiscreteModelSampling, sd_model_sampling
from latentrt.core.protocols import Conditioning, ModelSampling

SHAPES: tuple[tuple[str, tuple[int, int, int], tuple[int, int, int]], ...] = (
    ("circle", (220, 40, 40), (30, 60, 160)),
    ("square", (240, 200, 40), (40, 120, 60)),
    ("triangle", (60, 200, 90), (120, 40, 120)),
    ("ring", (250, 250, 250), (20, 20, 20)),
    ("diamond", (250, 140, 30), (60, 160, 200)),
    ("cross", (140, 60, 200), (230, 230, 200)),
)
"""(shape, colour, background) of each demo image."""


def _polygon(kind: str, c: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(c + r * math.cos(a), c + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(c, c - r), (c + r, c), (c, c + r), (c - r, c)]
    w = r / 3
    return [(c - w, c - r), (c + w, c - r), (c + w, c - w), (c + r, c - w), (c + r, c + w), (c + w, c + w),
            (c + w, c + r), (c - w, c + r), (c - w, c + w), (c - r, c + w), (c - r, c - w), (c - w, c - w)]  # fmt: skip


def draw_shape(
    kind: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int = 32
) -> Image.Image:
    """One demo image: a centred shape on a plain background."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    c, r = size / 2, size * 0.34
    box = (c - r, c - r, c + r, c + r)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, size // 10))
    else:
        draw.polygon(_polygon(kind, c, r), fill=colour)
    return image


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB image -> ``[3, H, W]`` float tensor in ``[-1, 1]``."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.reshape(image.height, image.width, 3).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0


def tensor_to_image(x: Tensor) -> Image.Image:
    """``[3, H, W]`` tensor in ``[-1, 1]`` -> PIL RGB image (clamped)."""
    pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


@dataclass
class ShapesDenoiser:
    """Exact denoiser of the :data:`SHAPES` images, in pixel space (no VAE needed)."""

    images: Tensor
    model_sampling: ModelSampling = field(default_factory=sd_model_sampling)

    @classmethod
    def build(cls, size: int = 32, shapes: Sequence[tuple[str, tuple[int, int, int], tuple[int, int, int]]] = SHAPES,
              model_sampling: DiscreteModelSampling | None = None) -> ShapesDenoiser:  # fmt: skip
        """Draw the demo images at ``size`` pixels."""
        images = torch.stack([image_to_tensor(draw_shape(*spec, size=size)) for spec in shapes])
        return cls(images=images, model_sampling=model_sampling or sd_model_sampling())

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
        """Posterior mean ``sum_i softmax(-||x - y_i||^2 / 2 sigma^2)_i y_i``."""
        flat_x = x.reshape(x.shape[0], -1)
        flat_y = self.images.reshape(self.images.shape[0], -1).to(x)
        sq_dist = torch.cdist(flat_x, flat_y).square()
        weights = torch.softmax(-sq_dist / (2 * sigma.to(x).reshape(-1, 1) ** 2), dim=1)
        return (weights @ flat_y).reshape(x.shape)
