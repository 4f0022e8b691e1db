"""Request checks the service runs before a request is queued, so a bad one never reaches a worker."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from latentrt.core.errors import InvalidRequest, PluginError
from latentrt.core.registry import Registry, SamplerSpec
from latentrt.core.request import GenerationRequest
from latentrt.core.sampling import check_options, check_sigmas
from latentrt.service.errors import InvalidField

__all__ = ["RequestLimits", "check_request"]

_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)}
_SpecT = TypeVar("_SpecT")


@dataclass(frozen=True)
class RequestLimits:
    """Upper bounds a service accepts; sizes must also be multiples of 8 (A1111's rule)."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 16
    max_input_pixels: int = 4096 * 4096  # decoded init images and masks
    max_prompt_chars: int = 20_000


def check_request(request: GenerationRequest, limits: RequestLimits, plugins: Registry) -> None:
    """Raise :class:`InvalidField` (field + reason) unless ``request`` can run within ``limits``."""
    for name, bound in (("steps", limits.max_steps), ("batch_size", limits.max_batch_size)):
        value = getattr(request, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise InvalidField(name, f"{name} must be an integer in 1..{bound} on this server, got {value!r}")
    _validate(request)
    _check_size(request, limits)
    _check_texts(request, limits)
    sampler = _lookup("sampler", plugins.sampler, request.sampler)
    if request.sigmas is None:
        _lookup("scheduler", plugins.scheduler, request.scheduler)
    else:
        _as_field("sigmas", functools.partial(check_sigmas, request.sigmas))
    _as_field("sampler_options", lambda: check_options(sampler.fn, sampler.name, dict(request.sampler_options)))
    _check_images(request, sampler)


def _validate(request: GenerationRequest) -> None:
    """``request.validate()``, its error attributed to the field its message starts with."""
    try:
        request.validate()
    except InvalidField:
        raise
    except InvalidRequest as exc:
        message = str(exc)
        first = re.match(r"(?:a )?(\w+)", message)
        field = first.group(1) if first and first.group(1) in _FIELDS else "request"
        raise InvalidField(field, message) from exc


def _check_size(request: GenerationRequest, limits: RequestLimits) -> None:
    init = request.init_image
    sizes = (("width", request.width, limits.max_width), ("height", request.height, limits.max_height))
    for name, given, bound in sizes:
        value = given if given is not None else (getattr(init, name) if init is not None else None)
        if value is None:
            continue  # the model's default size
        source = "" if given is not None else " (the init image's; pass width/height to resize it)"
        if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= bound or value % 8:
            raise InvalidField(name, f"{name} must be a multiple of 8 in 8..{bound}, got {value!r}{source}")


def _check_texts(request: GenerationRequest, limits: RequestLimits) -> None:
    """Prompts within the length limit and encodable as UTF-8 (no lone surrogates)."""
    for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
        value = getattr(request, name)
        for text in [value] if isinstance(value, str) else list(value or []):
            if len(text) > limits.max_prompt_chars:
                raise InvalidField(name, f"{name} has {len(text)} characters; at most {limits.max_prompt_chars}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidField(
                    name, f"{name} contains U+{ord(text[exc.start]):04X} (a lone surrogate); send valid Unicode text"
                ) from None


def _lookup(field: str, find: Callable[[str], _SpecT], name: str) -> _SpecT:
    try:
        return find(name)
    except PluginError as exc:
        raise InvalidField(field, str(exc)) from exc


def _as_field(field: str, check: Callable[[], None]) -> None:
    try:
        check()
    except InvalidRequest as exc:
        raise InvalidField(field, str(exc)) from exc


def _check_images(request: GenerationRequest, sampler: SamplerSpec) -> None:
    """Masks that match their image, and img2img strengths that leave at least one step."""
    init, mask = request.init_image, request.mask
    if init is not None and mask is not None and mask.size != init.size:
        raise InvalidField(
            "mask", f"mask is {mask.width}x{mask.height} but the init image is {init.width}x{init.height}: resize it"
        )
    img2img = init is not None and request.sigmas is None and request.strength < 1.0
    if img2img and int(request.steps * request.strength) < 1:
        raise InvalidField(
            "strength",
            f"strength {request.strength} leaves no steps out of {request.steps} for {sampler.label}: "
            "raise steps or strength",
        )
