"""The procedural demo dataset: reproducible, truthful captions, full coverage."""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
import torch
from torch import Tensor

from latentrt.plugins.demo.dataset import (
    COLOURS,
    MAX_OFFSET,
    REGION_PHRASES,
    REGIONS,
    SHAPE_NAMES,
    SIZES,
    DemoShapes,
    ShapeSample,
    caption_vocabulary,
    render,
    sample_spec,
)
from latentrt.plugins.demo.shapes import image_to_tensor

OPPOSITE = {
    "top left": "bottom right",
    "top": "bottom",
    "top right": "bottom left",
    "left": "right",
    "right": "left",
    "bottom left": "top right",
    "bottom": "top",
    "bottom right": "top left",
}


def _specs(n: int, seed: int = 0) -> list[ShapeSample]:
    rng = random.Random(seed)
    return [sample_spec(rng) for _ in range(n)]


def _mask(spec: ShapeSample, size: int = 64) -> Tensor:
    """``[H, W]`` bool: pixels exactly the shape colour (asserting the rest are background)."""
    pixels = torch.from_numpy(np.asarray(render(spec, size), dtype=np.int16))
    shape = (pixels == torch.tensor(COLOURS[spec.colour], dtype=torch.int16)).all(-1)
    background = (pixels == torch.tensor(COLOURS[spec.background], dtype=torch.int16)).all(-1)
    assert bool((shape | background).all()), "every pixel is the shape or the background colour"
    return shape


def _cell(mask: Tensor, region: str) -> Tensor:
    col, row = REGIONS[region]
    n = mask.shape[0]
    edges = [round(k * n / 3) for k in range(4)]
    return mask[edges[row] : edges[row + 1], edges[col] : edges[col + 1]]


def test_same_seed_and_index_give_identical_items() -> None:
    a, b = DemoShapes(seed=7, length=50), DemoShapes(seed=7, length=50)
    for i in (0, 13, 49, 31):  # random access, any order
        (xa, ca), (xb, cb) = a[i], b[i]
        assert ca == cb
        assert torch.equal(xa, xb)
    assert torch.equal(a[-1][0], a[49][0])
    with pytest.raises(IndexError):
        a[50]


def test_different_seeds_differ() -> None:
    a, b = DemoShapes(seed=1, length=20), DemoShapes(seed=2, length=20)
    assert [a[i][1] for i in range(20)] != [b[i][1] for i in range(20)]
    assert sum(not torch.equal(a[i][0], b[i][0]) for i in range(20)) >= 18
    # Items of one dataset are not all alike either.
    assert len({a[i][1] for i in range(20)}) >= 15


def test_items_are_rgb_tensors_in_range() -> None:
    data = DemoShapes(seed=3, length=8)
    assert len(data) == 8
    for i in range(len(data)):
        x, caption = data[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        assert isinstance(caption, str) and caption
        spec = data.spec(i)
        assert torch.equal(x, image_to_tensor(render(spec)))


def test_background_never_equals_shape_colour() -> None:
    assert all(spec.background != spec.colour for spec in _specs(2000))


def test_coverage_of_every_attribute() -> None:
    specs = _specs(2000)
    assert {s.shape for s in specs} == set(SHAPE_NAMES) >= {"circle", "square", "triangle", "star", "ring"}
    assert {s.colour for s in specs} == set(COLOURS)
    assert set(COLOURS) >= {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
    assert {s.background for s in specs} == set(COLOURS)
    assert {s.size for s in specs} == set(SIZES) == {"small", "medium", "large"}
    assert {s.region for s in specs} == set(REGIONS)
    assert len(REGIONS) == 9


def test_caption_words_are_in_the_vocabulary() -> None:
    vocabulary = set(caption_vocabulary())
    captions = {s.caption for s in _specs(2000)}
    used = {word for caption in captions for word in caption.split()}
    assert used <= vocabulary
    assert used == vocabulary, "every vocabulary word is reachable"


def test_captions_state_only_true_attributes() -> None:
    for spec in _specs(2000, seed=5):
        caption = spec.caption
        words = caption.split()
        assert spec.colour in words and spec.shape in words
        assert words[0] == ("an" if words[1][0] in "aeiou" else "a")
        # No other shape, size or colour is mentioned except the background's.
        assert not (set(words) & (set(SHAPE_NAMES) - {spec.shape}))
        assert not (set(words) & (set(SIZES) - {spec.size}))
        assert set(words) & set(COLOURS) <= {spec.colour, spec.background}
        if "background" in words:
            assert caption.endswith(f" {spec.background} background")
            assert words.count(spec.colour) == 1 or spec.colour == spec.background
        else:
            assert spec.background not in words
        region_phrases = [p for p in REGION_PHRASES.values() if f" {p}" in caption]
        if region_phrases:
            assert REGION_PHRASES[spec.region] in region_phrases
            assert max(region_phrases, key=len) == REGION_PHRASES[spec.region]


def _every_placement() -> list[ShapeSample]:
    """Every shape, size and region, at the centre and the four extreme offsets."""
    j = MAX_OFFSET
    offsets = [(0.0, 0.0), (-j, -j), (-j, j), (j, -j), (j, j)]
    return [
        ShapeSample(shape, "red", "blue", size, region, f"a {size} red {shape}", offset)
        for shape, size, region, offset in itertools.product(SHAPE_NAMES, SIZES, REGIONS, offsets)
    ]


@pytest.mark.parametrize("source", ["random", "exhaustive"])
def test_images_show_what_their_captions_say(source: str) -> None:
    """Shape colour dominates the named region, is absent from the opposite one; corners are background."""
    specs = _specs(300, seed=11) if source == "random" else _every_placement()
    for spec in specs:
        mask = _mask(spec)
        assert int(mask.sum()) >= 12, spec
        for corner in (mask[:3, :3], mask[:3, -3:], mask[-3:, :3], mask[-3:, -3:]):
            assert not bool(corner.any()), spec
        counts = {region: int(_cell(mask, region).sum()) for region in REGIONS}
        assert max(counts, key=lambda region: counts[region]) == spec.region, (spec, counts)
        # The shape's centroid lies in the named cell.
        ys, xs = torch.nonzero(mask, as_tuple=True)
        col, row = REGIONS[spec.region]
        assert col == int(xs.float().mean() * 3 // 64) and row == int(ys.float().mean() * 3 // 64), spec
        if spec.region in OPPOSITE:
            assert counts[OPPOSITE[spec.region]] == 0, spec


def test_sizes_are_ordered() -> None:
    base = ShapeSample("circle", "red", "blue", "small", "center", "a small red circle")
    areas = [int(_mask(dataclasses.replace(base, size=size)).sum()) for size in ("small", "medium", "large")]
    assert areas[0] < areas[1] < areas[2]
    # Filled shapes are recognisably different at the same size.
    fills = {shape: int(_mask(dataclasses.replace(base, shape=shape, size="large")).sum()) for shape in SHAPE_NAMES}
    assert len(set(fills.values())) == len(SHAPE_NAMES)
