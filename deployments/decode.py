"""Decode stage: untrusted bytes -> an upright RGB or RGBA ``PIL.Image``.

Limits are checked on the header, before any pixel is decoded, so a
decompression bomb costs nothing. Only common raster formats are opened: Pillow's
EPS, PDF or other plugins that shell out or parse documents are never reached.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deployments.errors import PayloadTooLarge, UnsupportedImage

# MPO (multi-picture JPEG) opens through the JPEG plugin.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Pillow's own bomb guard stays on as a second line: it warns above this and
# raises above twice this, at open. ``Limits.max_pixels`` may not exceed it, so
# an image within our limits never meets Pillow's guard.
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Register every plugin now: Pillow loads some lazily,
# and Image.open(formats=...) fails on a name not registered yet.
Image.init()


@dataclass(frozen=True)
class Limits:
    """What an upload may be: bytes on the wire, decoded pixels, longest side."""

    # Unknown keys in serve_config.yaml's `limits:` fail at start (pydantic
    # reads this; a plain dict keeps this module free of pydantic).
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    max_upload_bytes: int = 25 * 1024 * 1024
    # 50 megapixels: a 24-megapixel photo fits twice over; a decompression bomb
    # (Pillow warns above ~100 MP and raises above ~200 MP) does not.
    max_pixels: int = 50_000_000
    max_side: int = 20_000

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive")
        if self.max_pixels > MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels may be at most {MAX_IMAGE_PIXELS}")


def probe(data: bytes, limits: Limits) -> tuple[int, int]:
    """The image's (width, height) from its header alone, checked against ``limits``.

    Nothing is decoded; raises what ``decode`` would for a bad or too large image.
    """
    with _translated(limits):
        return _open(data, limits).size


def decode(data: bytes, limits: Limits) -> Image.Image:
    """Open ``data`` as an image in mode RGB or RGBA, EXIF orientation applied.

    Animated images give their first frame. L, LA, P, CMYK, 1 and 16-bit modes
    are converted; RGB and RGBA are kept as they are, as rembg keeps them.
    Raises ``UnsupportedImage`` (415) or ``PayloadTooLarge`` (413).
    """
    with _translated(limits):
        img = _open(data, limits)
        img.load()
        # In place: no copy when there is nothing to rotate (the usual case).
        ImageOps.exif_transpose(img, in_place=True)
        # Inside the translation: some modes (LAB from a TIFF, odd 16-bit layouts)
        # only fail here, and that is still the upload's fault, not ours.
        return _to_rgb_or_rgba(img)


def _open(data: bytes, limits: Limits) -> Image.Image:
    if not data:
        raise UnsupportedImage("the request body is empty; send an image")
    img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    _check_size(img.size, limits)
    return img


@contextmanager
def _translated(limits: Limits) -> Iterator[None]:
    """Pillow's exceptions for bad input, as the service's 413 and 415."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"the image has too many pixels (limit {limits.max_pixels})") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(
            "the body is not an image in a supported format "
            f"({', '.join(f.lower() for f in ALLOWED_FORMATS)})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as exc:
        # Pillow's plugins are not uniform: truncated or corrupt data surfaces as
        # any of these (struct.error and IndexError from header parsing in TIFF,
        # BMP and GIF). MemoryError is not caught: the limits above prevent it.
        raise UnsupportedImage("the image is truncated or corrupt") from exc


def _check_size(size: tuple[int, int], limits: Limits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise UnsupportedImage(f"the image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"the image has {width * height} pixels; the limit is {limits.max_pixels}"
        )
    if max(width, height) > limits.max_side:
        raise PayloadTooLarge(
            f"the image is {width}x{height}; no side may exceed {limits.max_side}"
        )


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("RGB", "RGBA"):
        return img
    if mode in ("LA", "PA", "RGBa", "La"):
        return img.convert("RGBA")
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them,
    # which turns most 16-bit photos white; scale the full range down instead,
    # in 4-byte integers (or float32 for float images), never float64.
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        top = max(float(values.max()), 1.0)
        gray = np.clip(np.rint(values * np.float32(255.0 / top)), 0, 255).astype(np.uint8)
    else:
        values = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        top = 65535 if img.mode.startswith("I;16") or values.max() > 255 else 255
        gray = ((values * 255 + top // 2) // top).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
