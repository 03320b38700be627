"""Decode stage: untrusted bytes -> an upright RGB or RGBA ``PIL.Image``.

Limits are checked on the header, before any pixel is decoded, so a
decompression bomb costs nothing. Only common raster formats are opened: Pillow's
EPS, PDF or other plugins that shell out or parse documents are never reached.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deployments.errors import PayloadTooLarge, UnsupportedImage
from deployments.settings import Limits

# MPO (multi-picture JPEG) opens through the JPEG plugin.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Pillow's own bomb guard stays on as a second line; our limits are tighter.
Image.MAX_IMAGE_PIXELS = 100_000_000
# Register every plugin now: Pillow loads some lazily,
# and Image.open(formats=...) fails on a name not registered yet.
Image.init()


def decode(data: bytes, limits: Limits) -> Image.Image:
    """Open ``data`` as an image in mode RGB or RGBA, EXIF orientation applied.

    Animated images give their first frame. L, LA, P, CMYK, 1 and 16-bit modes
    are converted; RGB and RGBA are kept as they are, as rembg keeps them.
    Raises ``UnsupportedImage`` (415) or ``PayloadTooLarge`` (413).
    """
    if not data:
        raise UnsupportedImage("the request body is empty; send an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            _check_size(img.size, limits)
            img.load()
            upright = ImageOps.exif_transpose(img)
            # Inside the try: some modes (LAB from a TIFF, odd 16-bit layouts)
            # only fail here, and that is still the upload's fault, not ours.
            return _to_rgb_or_rgba(upright)
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
    # which turns most 16-bit photos white; scale the full range down instead.
    values = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
    if img.mode == "F":
        top = max(float(values.max()), 1.0) if values.max() > 1 else 1.0
    gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
