"""A procedural, seeded dataset of captioned 64x64 shape images for training the demo model.

Every image is one flat shape (circle, square, triangle, star, ring) in one of a fixed palette
of colours, at one of three sizes, placed in one of nine named regions of a 3x3 grid, on a
plain background of a different palette colour. Drawing is done without antialiasing, so each
pixel is exactly the shape colour or the background colour. Captions come from a few templates
and only ever mention attributes the image really has ("a small green triangle in the top left",
"an orange star on a black background").

Nothing is downloaded: item ``i`` of ``DemoShapes(seed, length)`` is a pure function of
``(seed, i)``, so the dataset is reproducible and randomly accessible.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from latentrt.plugins.demo.shapes import image_to_tensor

RGB = tuple[int, int, int]

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
"""Every shape the dataset draws."""

COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Colour name -> fixed RGB value, for shapes and backgrounds alike."""

SIZES: dict[str, float] = {"small": 0.11, "medium": 0.15, "large": 0.19}
"""Size name -> shape radius as a fraction of the image side."""

REGIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
"""Region name -> (column, row) of its cell in the 3x3 grid over the image."""

REGION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
"""Region name -> how a caption says where the shape is."""

TEMPLATES: tuple[str, ...] = (
    "{a} {colour} {shape}",
    "{a} {colour} {shape} on {a_bg} {background} background",
    "{a} {size} {colour} {shape}",
    "{a} {colour} {shape} {where}",
    "{a} {size} {colour} {shape} {where}",
    "{a} {colour} {shape} {where} on {a_bg} {background} background",
    "{a} {size} {colour} {shape} on {a_bg} {background} background",
    "{a} {size} {colour} {shape} {where} on {a_bg} {background} background",
)
"""Caption templates; each fills only attributes the image has."""

_CENTRES = (0.2, 0.5, 0.8)  # cell centres along each axis, as fractions of the side
MAX_OFFSET = 0.04
"""Largest shift of a shape from its cell centre, per axis, as a fraction of the image side."""
RING_WIDTH = 0.4
"""A ring's stroke width as a fraction of its radius."""
SQUARE_HALF_SIDE = 0.85
"""Half a square's side as a fraction of its bounding radius."""
STAR_INNER = 0.5
"""A star's inner radius as a fraction of its outer radius."""
_MARGIN = 2  # pixels kept between the shape's bounding circle and the image edge


@dataclass(frozen=True)
class ShapeSample:
    """One image's description: what is drawn where, and its caption.

    ``offset`` is a small shift of the shape from its region's centre, as fractions of the
    image side (x, y); it adds variety without changing which region the shape is in.
    """

    shape: str
    colour: str
    background: str
    size: str
    region: str
    caption: str
    offset: tuple[float, float] = (0.0, 0.0)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(template: str, shape: str, colour: str, background: str, size: str, region: str) -> str:
    """Fill ``template`` with the given attributes (with the right article, a/an)."""
    first = size if "{size}" in template else colour
    return template.format(
        a=_article(first),
        a_bg=_article(background),
        colour=colour,
        shape=shape,
        background=background,
        size=size,
        where=REGION_PHRASES[region],
    )


def sample_spec(rng: random.Random) -> ShapeSample:
    """Draw a random image description (attributes, offset and caption) from ``rng``."""
    shape = rng.choice(SHAPE_NAMES)
    colour = rng.choice(list(COLOURS))
    background = rng.choice([name for name in COLOURS if name != colour])
    size = rng.choice(list(SIZES))
    region = rng.choice(list(REGIONS))
    offset = (rng.uniform(-MAX_OFFSET, MAX_OFFSET), rng.uniform(-MAX_OFFSET, MAX_OFFSET))
    caption = make_caption(rng.choice(TEMPLATES), shape, colour, background, size, region)
    return ShapeSample(shape, colour, background, size, region, caption, offset)


def shape_geometry(spec: ShapeSample, size: int = 64) -> tuple[float, float, float]:
    """``(cx, cy, r)`` in pixels: the centre and bounding radius of ``spec``'s shape."""
    r = SIZES[spec.size] * size
    col, row = REGIONS[spec.region]
    lo, hi = r + _MARGIN, size - 1 - r - _MARGIN
    cx = min(max((_CENTRES[col] + spec.offset[0]) * size, lo), hi)
    cy = min(max((_CENTRES[row] + spec.offset[1]) * size, lo), hi)
    return cx, cy, r


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else STAR_INNER * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render(spec: ShapeSample, size: int = 64) -> Image.Image:
    """Draw ``spec`` as a ``size`` x ``size`` RGB image (no antialiasing: two colours exactly)."""
    image = Image.new("RGB", (size, size), COLOURS[spec.background])
    cx, cy, r = shape_geometry(spec, size)
    draw_shape(ImageDraw.Draw(image), spec.shape, cx, cy, r, COLOURS[spec.colour])
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: RGB) -> None:
    """Draw one ``shape`` centred at ``(cx, cy)`` with bounding radius ``r`` pixels."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(RING_WIDTH * r)))
    elif shape == "square":
        h = SQUARE_HALF_SIDE * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPE_NAMES)}")


def caption_vocabulary() -> list[str]:
    """Every word any caption can use, sorted."""
    words: set[str] = {"a", "an", *SHAPE_NAMES, *COLOURS, *SIZES}
    for phrase in REGION_PHRASES.values():
        words.update(phrase.split())
    for template in TEMPLATES:
        words.update(re.sub(r"\{[a-z_]+\}", " ", template).split())
    return sorted(words)


class DemoShapes(Dataset[tuple[Tensor, str]]):
    """``length`` captioned shape images; item ``i`` depends only on ``(seed, i)``.

    Each item is ``(image, caption)`` with ``image`` a ``[3, size, size]`` float tensor
    in ``[-1, 1]``.
    """

    def __init__(self, seed: int, length: int, size: int = 64) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.seed = seed
        self.length = length
        self.size = size

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> ShapeSample:
        """The description of item ``index`` (negative indices count from the end)."""
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for DemoShapes of length {self.length}")
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return sample_spec(random.Random(f"latentrt-demo-shapes:{self.seed}:{index}"))

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        spec = self.spec(index)
        return image_to_tensor(render(spec, self.size)), spec.caption
