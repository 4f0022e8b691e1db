"""Judge a demo image with plain pixel statistics: shape colour, shape kind and position.

Used to check the demo model (tests, ``tools/train_demo.py``'s report) with no learned
classifier involved:

1. the background colour is the median of the image's 2-pixel border (shapes never touch it);
2. the shape is every pixel far from that colour (distance above a threshold set between
   the background and the farthest pixels), reduced to its largest 4-connected component;
3. its colour is the nearest palette colour to the median of the half of those pixels
   farthest from the background (edge pixels blend into it);
4. its kind is the template that overlaps it best (intersection over union): each of the
   dataset's shapes is drawn at the size and place the shape's bounding box implies, with
   small size and position adjustments;
5. its position is the centroid of the shape's pixels.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from latentrt.core.request import GenerationRequest
from latentrt.plugins.demo.dataset import COLOURS, SHAPE_NAMES, SQUARE_HALF_SIDE, draw_shape

if TYPE_CHECKING:
    from latentrt.core.pipeline import Pipeline

__all__ = ["EVAL_PROMPTS", "Judgement", "PromptScore", "caption", "judge", "score_prompt"]

_BORDER = 2
_MIN_PIXELS = 12  # fewer shape pixels than this: no shape found
_MIN_CONTRAST = 40.0  # RGB distance below which nothing counts as shape
_STAR_WIDTH = 2 * math.sin(2 * math.pi / 5)  # a star's bounding box, in units of its outer radius
_STAR_HEIGHT = 1 + math.cos(math.pi / 5)

Mask = NDArray[np.bool_]


@dataclass(frozen=True)
class Judgement:
    """What the pixels say: ``shape`` is None when no shape stands out from the background."""

    colour: str | None
    shape: str | None
    background: str
    centre: tuple[float, float] | None
    """(x, y) centroid of the shape's pixels."""
    iou: float
    """How well the chosen template fits (1 = exactly)."""


def judge(image: Image.Image) -> Judgement:
    """Colour, shape, background and centre of the one shape in ``image``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    background = _border_median(pixels)
    mask = _largest_component(_foreground(pixels, background))
    background_name = _nearest_colour(background)
    if mask.sum() < _MIN_PIXELS:
        return Judgement(None, None, background_name, None, 0.0)
    colour = _nearest_colour(_core_colour(pixels[mask], background))
    ys, xs = np.nonzero(mask)
    shape, iou = _best_template(mask)
    return Judgement(colour, shape, background_name, (float(xs.mean()), float(ys.mean())), iou)


def _border_median(pixels: NDArray[np.float64]) -> NDArray[np.float64]:
    frame = np.concatenate([
        pixels[:_BORDER].reshape(-1, 3), pixels[-_BORDER:].reshape(-1, 3),
        pixels[:, :_BORDER].reshape(-1, 3), pixels[:, -_BORDER:].reshape(-1, 3),
    ])  # fmt: skip
    return np.asarray(np.median(frame, axis=0))


def _foreground(pixels: NDArray[np.float64], background: NDArray[np.float64]) -> Mask:
    """Pixels nearer the far end of the distance range than the background."""
    distance = np.linalg.norm(pixels - background, axis=-1)
    far = float(np.percentile(distance, 99))
    return np.asarray(distance > max(_MIN_CONTRAST, 0.5 * far))


def _largest_component(mask: Mask) -> Mask:
    """The largest 4-connected region of ``mask`` (a flood fill; images are small)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        label += 1
        labels[y, x] = label
        queue, size = deque([(y, x)]), 0
        while queue:
            cy, cx = queue.popleft()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return np.asarray(labels == best) if best else np.zeros_like(mask)


def _core_colour(shape_pixels: NDArray[np.float64], background: NDArray[np.float64]) -> NDArray[np.float64]:
    """Median colour of the half of the shape's pixels farthest from the background (edges blend)."""
    distance = np.linalg.norm(shape_pixels - background, axis=-1)
    return np.asarray(np.median(shape_pixels[distance >= np.median(distance)], axis=0))


def _nearest_colour(rgb: NDArray[np.float64]) -> str:
    return min(COLOURS, key=lambda name: float(np.linalg.norm(np.asarray(COLOURS[name]) - rgb)))


def _best_template(mask: Mask) -> tuple[str, float]:
    """The dataset shape whose drawing overlaps ``mask`` best, and that overlap (IoU)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    width, height = x1 - x0 + 1, y1 - y0 + 1
    scores = {shape: _fit(mask, shape, x0, x1, y0, width, height) for shape in SHAPE_NAMES}
    best = max(scores, key=lambda shape: scores[shape])
    return best, scores[best]


def _fit(mask: Mask, shape: str, x0: int, x1: int, y0: int, width: int, height: int) -> float:
    """Best IoU of ``shape`` placed where the bounding box says, over small adjustments."""
    cx, cy, r = _placement(shape, x0, x1, y0, width, height)
    best = 0.0
    for dr in (-1.0, -0.5, 0.0, 0.5, 1.0):
        for dx in (-1.0, 0.0, 1.0):
            for dy in (-1.0, 0.0, 1.0):
                template = _draw(mask.shape, shape, cx + dx, cy + dy, max(1.0, r + dr))
                union = np.logical_or(mask, template).sum()
                best = max(best, float(np.logical_and(mask, template).sum() / union))
    return best


def _placement(shape: str, x0: int, x1: int, y0: int, width: int, height: int) -> tuple[float, float, float]:
    """(cx, cy, r) of ``shape`` that would fill the bounding box (see dataset.draw_shape)."""
    cx = (x0 + x1) / 2
    if shape in ("circle", "ring"):
        r = (width + height) / 4
        return cx, y0 + r, r
    if shape == "square":
        r = (width + height) / 4 / SQUARE_HALF_SIDE
        return cx, y0 + (width + height) / 4, r
    if shape == "triangle":  # apex up: width sqrt(3) r, height 1.5 r, centre r below the apex
        r = (width / math.sqrt(3) + height / 1.5) / 2
        return cx, y0 + r, r
    r = (width / _STAR_WIDTH + height / _STAR_HEIGHT) / 2  # star, point up
    return cx, y0 + r, r


def _draw(size: tuple[int, ...], shape: str, cx: float, cy: float, r: float) -> Mask:
    canvas = Image.new("RGB", (size[1], size[0]), (0, 0, 0))
    draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r, (255, 255, 255))
    return np.asarray(canvas)[..., 0] > 0


#: (colour, shape) prompts the demo model is scored on: "a red circle", ...
EVAL_PROMPTS: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "star"),
    ("purple", "ring"),
    ("orange", "square"),
    ("white", "circle"),
    ("black", "triangle"),
)


@dataclass(frozen=True)
class PromptScore:
    """How often images for one "a {colour} {shape}" prompt had that colour and shape."""

    prompt: str
    colour_rate: float
    shape_rate: float
    judgements: tuple[Judgement, ...]


def caption(colour: str, shape: str) -> str:
    """``"a red circle"`` / ``"an orange star"``."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def score_prompt(
    pipeline: Pipeline, colour: str, shape: str, *, seeds: int = 20, seed: int = 0, **request: Any
) -> PromptScore:
    """Generate ``seeds`` images (seeds ``seed, seed+1, ...``) for "a {colour} {shape}" and judge them.

    ``request`` holds further :class:`GenerationRequest` fields (``cfg_scale``, ``steps``, ...).
    """
    prompt = caption(colour, shape)
    result = pipeline.generate(GenerationRequest(prompt=prompt, seed=seed, batch_size=seeds, **request))
    judgements = tuple(judge(image) for image in result.images)
    return PromptScore(
        prompt,
        colour_rate=sum(j.colour == colour for j in judgements) / seeds,
        shape_rate=sum(j.shape == shape for j in judgements) / seeds,
        judgements=judgements,
    )
