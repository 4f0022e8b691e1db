"""The pixel-statistics judge that scores the demo model, checked on images whose truth is known."""

from __future__ import annotations

import pytest
from PIL import Image, ImageFilter

from latentrt.plugins.demo.classify import caption, judge
from latentrt.plugins.demo.dataset import COLOURS, SHAPE_NAMES, DemoShapes, ShapeSample, render, shape_geometry

COUNT = 300


@pytest.fixture(scope="module")
def specs() -> list[ShapeSample]:
    dataset = DemoShapes(seed=12345, length=COUNT)
    return [dataset.spec(i) for i in range(COUNT)]


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_judge_reads_rendered_shapes(specs: list[ShapeSample], blur: float) -> None:
    """Dataset renders (truth known): every colour, shape and background right, centres within 1.5 px.

    A 1-pixel Gaussian blur stands in for the softness of decoded images: still at least 97% right.
    """
    right_colour = right_shape = right_background = 0
    errors = []
    for spec in specs:
        image = render(spec)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        verdict = judge(image)
        right_colour += verdict.colour == spec.colour
        right_shape += verdict.shape == spec.shape
        right_background += verdict.background == spec.background
        assert verdict.centre is not None
        cx, cy, _ = shape_geometry(spec)
        errors.append(((verdict.centre[0] - cx) ** 2 + (verdict.centre[1] - cy) ** 2) ** 0.5)
    need = COUNT if blur == 0 else 0.97 * COUNT
    assert right_colour >= need and right_shape >= need and right_background >= need
    # Centroids of a triangle and a star sit below their circumcentre; 1.5 px bounds that offset.
    assert sum(errors) / len(errors) < 1.5


def test_judge_covers_every_shape_and_colour(specs: list[ShapeSample]) -> None:
    """The check above is not vacuous: the sample holds every shape and every colour."""
    assert {s.shape for s in specs} == set(SHAPE_NAMES)
    assert {s.colour for s in specs} == set(COLOURS)


def test_plain_image_has_no_shape() -> None:
    verdict = judge(Image.new("RGB", (64, 64), COLOURS["green"]))
    assert verdict.shape is None and verdict.colour is None and verdict.centre is None
    assert verdict.background == "green"


def test_speckles_are_not_a_shape() -> None:
    """A few isolated off-colour pixels stay below the minimum shape size."""
    image = Image.new("RGB", (64, 64), COLOURS["blue"])
    for xy in ((10, 10), (30, 40), (50, 20)):
        image.putpixel(xy, COLOURS["yellow"])
    assert judge(image).shape is None


def test_caption_articles() -> None:
    assert caption("red", "circle") == "a red circle"
    assert caption("orange", "star") == "an orange star"
