"""A generation request: everything one call to a pipeline may ask for, validated up front.

Names follow A1111's API where one exists (``cfg_scale``, ``denoising_strength`` is
``strength`` here, ``clip_skip``); every check raises
:class:`~latentrt.core.errors.InvalidRequest` saying what to change, before any work.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch import Tensor

from latentrt.core.errors import InvalidRequest

__all__ = ["GenerationRequest", "resolve_seed"]


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img, img2img or inpainting request (a batch of ``batch_size`` images).

    ``prompt``/``negative_prompt`` may be one string for the whole batch or one per image.
    ``seed = -1`` draws a random seed; image k uses ``seed + k``. ``width``/``height``
    default to the init image's size, else the model's default. ``init_image`` makes it
    img2img with ``strength`` (1.0 = start from pure noise); ``mask`` (white = repaint)
    makes it inpainting. ``sigmas`` overrides the schedule entirely (ComfyUI's custom
    sigmas). ``sampler_options`` go to the sampler (``eta``, ``s_churn``, ...).
    """

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = -1
    batch_size: int = 1
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    init_image: Image.Image | None = None
    strength: float = 0.75
    mask: Image.Image | None = None
    sigmas: Tensor | None = None
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    prompt_2: str | Sequence[str] | None = None
    negative_prompt_2: str | Sequence[str] | None = None
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    refiner_switch_at: float | None = None

    def secondary_prompts(self) -> list[str] | None:
        """SDXL's second-encoder prompts (diffusers' ``prompt_2``), one per image, or None."""
        return None if self.prompt_2 is None else _per_image(self.prompt_2, self.batch_size, "prompt_2")

    def secondary_negatives(self) -> list[str] | None:
        """SDXL's second-encoder negative prompts, one per image, or None."""
        if self.negative_prompt_2 is None:
            return None
        return _per_image(self.negative_prompt_2, self.batch_size, "negative_prompt_2")

    def prompts(self) -> list[str]:
        """One prompt per image."""
        return _per_image(self.prompt, self.batch_size, "prompt")

    def negative_prompts(self) -> list[str]:
        """One negative prompt per image."""
        return _per_image(self.negative_prompt, self.batch_size, "negative_prompt")

    def size(self, default: int, multiple: int) -> tuple[int, int]:
        """``(width, height)``: given, else the init image's, else ``default``; checked."""
        width = self.width or (self.init_image.width if self.init_image is not None else default)
        height = self.height or (self.init_image.height if self.init_image is not None else default)
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % multiple:
                raise InvalidRequest(
                    f"{name} must be a positive multiple of {multiple}, got {value}; "
                    f"try {max(multiple, value - value % multiple)}"
                )
        return width, height

    def validate(self) -> None:
        """Refuse impossible settings before any work is done."""
        _check_int("steps", self.steps, 1, 10_000)
        _check_int("batch_size", self.batch_size, 1, 256)
        _check_int("clip_skip", self.clip_skip, 1, 12)
        _check_float("cfg_scale", self.cfg_scale, 0.0, 100.0)
        _check_float("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        if self.init_image is not None:
            _check_float("strength", self.strength, 0.0, 1.0)
            if self.strength == 0.0:
                raise InvalidRequest("strength must be > 0 (0 would return the init image unchanged)")
        if self.mask is not None and self.init_image is None:
            raise InvalidRequest("a mask needs an init image: pass init_image= (the picture to inpaint)")
        if self.refiner_switch_at is not None:
            _check_float("refiner_switch_at", self.refiner_switch_at, 0.0, 1.0)
        for name, meaning in (
            ("original_size", "width, height"),
            ("target_size", "width, height"),
            ("crop", "top, left"),
        ):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or not all(isinstance(v, int) and v >= 0 for v in value)):
                raise InvalidRequest(f"{name} must be two integers >= 0 ({meaning}), got {value!r}")
        if not isinstance(self.seed, int) or not -1 <= self.seed < 2**32:
            raise InvalidRequest(f"seed must be -1 (random) or an integer in 0..2**32-1, got {self.seed!r}")
        self.prompts()
        self.negative_prompts()
        self.secondary_prompts()
        self.secondary_negatives()


def _per_image(value: str | Sequence[str], batch: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * batch
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{name} must be a string or a list of strings")
    if len(value) != batch:
        raise InvalidRequest(f"{name} has {len(value)} entries for batch_size {batch}; give one or one per image")
    return list(value)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be in {low}..{high}, got {value}")


def resolve_seed(seed: int) -> int:
    """``-1`` becomes a random 32-bit seed (as A1111 does); others pass through."""
    return secrets.randbelow(2**32) if seed == -1 else seed
