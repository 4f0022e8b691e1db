"""A1111 "parameters" PNG text: the exact format, parsing it back, and PNG round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from latentrt.core.errors import InvalidRequest
from latentrt.core.parameters import (
    Parameters,
    format_parameters,
    parse_parameters,
    read_png_parameters,
    save_png,
)

# The example from REFERENCE.md, as A1111 writes it.
REFERENCE_TEXT = (
    "a photo of a cat\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
)


def test_format_matches_a1111_example_with_keys_in_a1111_order() -> None:
    settings = {  # deliberately out of order
        "Model": "v1-5-pruned-emaonly",
        "Seed": 123,
        "Steps": 20,
        "Size": "512x512",
        "CFG scale": 7.0,
        "Sampler": "DPM++ 2M",
        "Model hash": "6ce0161689",
        "Schedule type": "Karras",
        "Clip skip": 1,
    }
    assert format_parameters(Parameters("a photo of a cat", "blurry", settings)) == REFERENCE_TEXT


def test_values_with_commas_or_colons_are_quoted_and_extras_come_before_version() -> None:
    settings = {"Version": "latentrt 0.1.0", "Lora hashes": "a: 1, b: 2", "Steps": 4, "Clip skip": 2, "Seed": 1}
    text = format_parameters(Parameters("p", settings=settings))
    assert text == 'p\nSteps: 4, Seed: 1, Clip skip: 2, Lora hashes: "a: 1, b: 2", Version: latentrt 0.1.0'


def test_parse_reference_text() -> None:
    parsed = parse_parameters(REFERENCE_TEXT)
    assert parsed.prompt == "a photo of a cat"
    assert parsed.negative_prompt == "blurry"
    assert parsed.settings["Sampler"] == "DPM++ 2M"
    assert parsed.settings["Model hash"] == "6ce0161689"
    assert list(parsed.settings)[:3] == ["Steps", "Sampler", "Schedule type"]


def test_round_trip_with_multiline_prompts_and_quoted_values() -> None:
    params = Parameters(
        "a castle,\n(masterpiece:1.2)", "lowres\nbad hands", {"Steps": "30", "Seed": "7", "Note": 'say "hi", ok'}
    )
    assert parse_parameters(format_parameters(params)) == params


def test_text_without_a_settings_line_is_all_prompt() -> None:
    parsed = parse_parameters("just a prompt: with a colon")
    assert parsed.prompt == "just a prompt: with a colon"
    assert parsed.settings == {}


def test_png_round_trip_is_atomic(tmp_path: Path) -> None:
    out = save_png(Image.new("RGB", (8, 8), (255, 0, 0)), tmp_path / "cat.png", REFERENCE_TEXT)
    assert read_png_parameters(out) == REFERENCE_TEXT
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]


def test_png_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"must be a \.png"):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "cat.jpg", "x")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(InvalidRequest, match="has no 'parameters' text"):
        read_png_parameters(tmp_path / "plain.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InvalidRequest, match="not a readable image"):
        read_png_parameters(tmp_path / "junk.png")
    with pytest.raises(InvalidRequest, match="must be a string"):
        parse_parameters(b"bytes")  # type: ignore[arg-type]
