"""A1111's "parameters" text: what every generated PNG carries, and how tools read it back.

Format (A1111 ``modules/processing.py`` ``create_infotext`` and
``modules/infotext_utils.py`` ``parse_generation_parameters``)::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, ...

The prompt may span lines; the negative prompt follows ``Negative prompt:``; the last
line is ``key: value`` pairs joined by ``", "``, where a value containing a comma, colon
or newline is JSON-quoted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from latentrt.core.errors import InvalidRequest

__all__ = [
    "KEY_ORDER",
    "Parameters",
    "format_parameters",
    "parse_parameters",
    "read_png_parameters",
    "save_png",
]

KEY_ORDER = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "VAE hash",
    "VAE",
    "Denoising strength",
    "Clip skip",
    "RNG",
)
"""A1111's order of the known keys; other keys follow in insertion order, then ``Version``."""

# A1111's re_param: a key (word chars, spaces, dashes, slashes) then a quoted or plain value.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


@dataclass
class Parameters:
    """Prompt, negative prompt and the generation settings under their A1111 keys (parsed: strings)."""

    prompt: str
    negative_prompt: str = ""
    settings: dict[str, object] = field(default_factory=dict)


def _quote(value: str) -> str:
    """A1111's ``quote``: JSON-quote values that would break the comma-separated line."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _format_value(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _ordered(settings: Mapping[str, object]) -> list[tuple[str, str]]:
    items = {k: _format_value(v) for k, v in settings.items() if v is not None}
    if "Clip skip" in items and int(float(items["Clip skip"])) <= 1:
        del items["Clip skip"]  # A1111 writes clip skip only when > 1
    known = [(k, items[k]) for k in KEY_ORDER if k in items]
    extras = [(k, v) for k, v in items.items() if k not in KEY_ORDER and k != "Version"]
    version = [("Version", items["Version"])] if "Version" in items else []
    return known + extras + version


def format_parameters(params: Parameters) -> str:
    """The parameters text A1111 writes into a PNG's ``parameters`` chunk."""
    line = ", ".join(k if k == v else f"{k}: {_quote(v)}" for k, v in _ordered(params.settings))
    negative = f"\n{_NEGATIVE} {params.negative_prompt}" if params.negative_prompt else ""
    return f"{params.prompt}{negative}\n{line}".strip()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value
    return value


def parse_parameters(text: str) -> Parameters:
    """Read A1111's parameters text back: prompt, negative prompt and settings."""
    if not isinstance(text, str):
        raise InvalidRequest(f"parameters text must be a string, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111's rule: fewer than 3 pairs means it is prompt text
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if negative_lines:
            negative_lines.append(line)
        elif line.strip().startswith(_NEGATIVE):
            negative_lines.append(line.strip().removeprefix(_NEGATIVE).strip())
        else:
            prompt_lines.append(line)
    settings: dict[str, object] = {k.strip(): _unquote(v.strip()) for k, v in _PARAM.findall(last)}
    return Parameters("\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), settings)


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write ``image`` as PNG with a ``parameters`` text chunk, through a temp file and a rename."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidRequest(f"output must be a .png file, got {path}")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_png_parameters(path: str | Path) -> str:
    """The ``parameters`` text of a PNG written by latentrt, A1111 or compatible tools."""
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: not a readable image ({exc})") from exc
    if not isinstance(text, str):
        raise InvalidRequest(f"{path}: has no 'parameters' text (not made by latentrt or A1111?)")
    return text
