"""Base64 images in and out of the API, checked before anything is decoded in full."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, PngImagePlugin

from latentrt.service.errors import InvalidField

__all__ = ["decode_image", "encode_png"]


def decode_image(data: object, field: str, max_pixels: int) -> Image.Image:
    """A base64 image (optionally a ``data:image/...;base64,`` URL), fully loaded; errors name ``field``."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidField(field, f"{field} must be a base64-encoded image, got {_describe(data)}")
    if data.startswith(("http://", "https://")):
        raise InvalidField(field, f"{field}: the server does not fetch URLs; send the image itself, base64-encoded")
    payload = data.split(";base64,", 1)[1] if data.startswith("data:") and ";base64," in data else data
    try:
        raw = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidField(field, f"{field} is not valid base64 ({exc})") from None
    return _open(raw, field, max_pixels)


def _open(raw: bytes, field: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidField(field, f"{field} is {width}x{height}, more than the {max_pixels} pixels allowed")
            image.load()
    except InvalidField:
        raise
    except Exception as exc:  # decoders raise many kinds on malformed data; all mean "not an image"
        raise InvalidField(field, f"{field} is not a readable image ({type(exc).__name__}: {exc})") from None
    if width < 1 or height < 1:
        raise InvalidField(field, f"{field} is empty ({width}x{height})")
    return image


def _describe(value: object) -> str:
    return "an empty string" if value == "" else type(value).__name__


def encode_png(image: Image.Image, parameters: str | None) -> str:
    """``image`` as a base64 PNG carrying ``parameters`` as its A1111 ``parameters`` text chunk."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
