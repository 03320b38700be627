"""Decode stage: untrusted bytes -> an upright RGB or RGBA ``PIL.Image``.

Limits are checked on the header, before any pixel is decoded, so a
decompression bomb costs nothing. Only common raster formats are opened: Pillow's
EPS, PDF or other plugins that shell out or parse documents are never reached.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

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

# Each scan of a progressive JPEG passes over every block of its components, however
# few bytes it takes (an empty refinement scan is 36 B), so decoding costs scans x
# pixels, not the file's size: a 2000x2000 JPEG whose last scan is repeated 45,000
# times is 1.6 MB and ~80 s of CPU. libjpeg's, mozjpeg's and Photoshop's progressions
# have 6-12 scans (10 for libjpeg's colour default), and a baseline JPEG one per
# component at most: 64 leaves room for any encoder's script while bounding the decode
# at ~6 times a normal progressive one (~2 s at 50 MP on one core).
MAX_JPEG_SCANS = 64
# Segments walked at most when counting scans: a legitimate JPEG has tens (a few
# hundred with a chunked ICC profile or extended XMP); 25 MiB of empty 4-byte
# segments would make the walk itself cost seconds.
MAX_JPEG_SEGMENTS = 4096
# A marker after 0xFF: not 0x00 (a stuffed 0xFF byte in entropy-coded data), not a
# restart marker (D0-D7, which may sit inside a scan's data), not a fill byte (FF).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOI, _SOS, _EOI, _TEM = 0xD8, 0xDA, 0xD9, 0x01


class _TextBoundPngStream(PngImagePlugin.PngStream):
    """PNG text chunks (tEXt, zTXt, iTXt) skipped unread, except those Pillow takes
    the orientation from (EXIF as text, XMP).

    Pillow keeps every text chunk in ``info``, inflated: a 66 KB PNG of zTXt chunks
    held 63 MiB from decode to encode, and took 0.65 s to inflate at each open. The
    service never uses the text; skipping it costs no legitimate image anything (AI
    image generators write their whole workflow into tEXt), where a tighter
    ``MAX_TEXT_MEMORY`` for all would refuse those.
    """

    # Keys Image.getexif() reads the orientation from (b"exif" is Pillow's own tEXt).
    _KEPT = (b"exif\0", b"Raw profile type exif\0", b"XML:com.adobe.xmp\0")

    def _skipped(self, pos: int, length: int) -> bool:
        assert self.fp is not None
        head = self.fp.read(min(length, 32))
        self.fp.seek(pos)
        return not head.startswith(self._KEPT)

    def chunk_tEXt(self, pos: int, length: int) -> bytes:
        if self._skipped(pos, length):
            return ImageFile._safe_read(self.fp, length)  # type: ignore[arg-type]
        return super().chunk_tEXt(pos, length)

    def chunk_zTXt(self, pos: int, length: int) -> bytes:
        if self._skipped(pos, length):
            return ImageFile._safe_read(self.fp, length)  # type: ignore[arg-type]
        return super().chunk_zTXt(pos, length)

    def chunk_iTXt(self, pos: int, length: int) -> bytes:
        if self._skipped(pos, length):
            return ImageFile._safe_read(self.fp, length)  # type: ignore[arg-type]
        return super().chunk_iTXt(pos, length)


# PngImageFile builds its chunk reader from this module global. The kept text is
# bounded: 1 MiB inflated per chunk (Pillow's default MAX_TEXT_CHUNK), 4 MiB in all,
# beyond which Pillow raises ValueError (a 415 here).
PngImagePlugin.PngStream = _TextBoundPngStream  # type: ignore[misc]
PngImagePlugin.MAX_TEXT_MEMORY = 4 * PngImagePlugin.MAX_TEXT_CHUNK


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
    # Every SOS marker is an FF DA in the bytes, so a file with no more FF DA than
    # the bound needs no walk (the usual case: one C-speed count).
    if (
        img.format in ("JPEG", "MPO")
        and data.count(b"\xff\xda") > MAX_JPEG_SCANS
        and jpeg_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS
    ):
        # 415, not 413: the image is not too large; this JPEG's structure is one
        # the service does not take. Re-encoding it gives an acceptable file.
        raise UnsupportedImage(
            f"the JPEG has over {MAX_JPEG_SCANS} scans (or {MAX_JPEG_SEGMENTS} "
            f"segments); at most {MAX_JPEG_SCANS} are accepted (re-encode it)"
        )
    return img


def jpeg_scans(data: bytes, stop: int, max_segments: int = MAX_JPEG_SEGMENTS) -> int:
    """Start-of-scan (SOS) markers in the first image of the JPEG stream ``data``,
    counted up to ``stop + 1``; ``stop + 1`` also when over ``max_segments``
    segments come before the end.

    Walks the marker segments as libjpeg does: a segment is skipped by its length,
    and after a scan's header the entropy-coded data up to the next marker, where an
    0xFF byte is always followed by 0x00 or a restart marker (so FF DA in it cannot
    be an SOS). Segments' payloads are never searched, so the FF DA of a thumbnail
    inside EXIF is not counted. Stops at EOI: a later image (MPO) is not decoded.
    """
    scans = 0
    pos = 2  # after SOI, which Pillow has checked
    for _ in range(max_segments):
        if scans > stop:
            return scans
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            break
        marker, pos = data[found.end() - 1], found.end()
        if marker in (_EOI, _SOI):  # a second SOI is an error to libjpeg
            break
        if marker == _TEM:  # no length
            continue
        if marker == _SOS:
            scans += 1
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            break  # corrupt: libjpeg stops here too
        pos += length
    else:
        return stop + 1
    return scans


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
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as exc:
        # Pillow's plugins are not uniform: truncated or corrupt data surfaces as
        # any of these (struct.error and IndexError from header parsing in TIFF,
        # BMP and GIF; TypeError from a TIFF whose strip offsets are typed FLOAT,
        # found by fuzzing: a 500 with a traceback before). MemoryError is not
        # caught: the limits above prevent it.
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
    # One working array, changed in place: 4 bytes a pixel besides the decoded image.
    if img.mode == "F":
        values = np.array(img, dtype=np.float32)
        # NaN and infinities (a float TIFF may hold them) would turn the scale, and
        # so every pixel, into NaN: the largest finite value is white, NaN and -inf
        # black, +inf white.
        finite = np.isfinite(values)
        top = max(float(values.max(where=finite, initial=0.0)), 1.0)
        del finite
        np.nan_to_num(values, copy=False, nan=0.0, posinf=top, neginf=0.0)
        values *= np.float32(255.0 / top)
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        gray = values.astype(np.uint8)
    else:
        values = np.array(img, dtype=np.int32)  # I is int32 already; I;16 widened
        np.clip(values, 0, 65535, out=values)
        top = 65535 if img.mode.startswith("I;16") or values.max() > 255 else 255
        values *= 255
        values += top // 2
        values //= top
        gray = values.astype(np.uint8)
    del values
    return Image.fromarray(gray).convert("RGB")
