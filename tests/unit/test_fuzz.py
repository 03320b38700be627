"""Property tests: decode() on hostile bytes only ever raises the service's 413/415.

Arbitrary bytes and valid PNG/JPEG/GIF/WebP/BMP/TIFF files with bytes flipped,
cut or spliced must either decode to an RGB/RGBA image within the limits or
raise ``UnsupportedImage`` / ``PayloadTooLarge``; each example runs under a
wall-clock timeout so that a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import concurrent.futures
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import gradient, image_bytes
from deployments.decode import Limits, decode
from deployments.errors import PayloadTooLarge, UnsupportedImage

# Small limits keep every example cheap while still crossing them often.
# Pillow warns about corrupt EXIF blocks and reads on; that is what we want.
# Pillow warns about the corrupt metadata the fuzzer makes (EXIF, TIFF tags);
# decode then either succeeds or raises one of ours, which is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL\\..*")

LIMITS = Limits(max_upload_bytes=1 << 20, max_pixels=4_000_000, max_side=4_000)
TIMEOUT_S = 5.0

_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fuzz")


def _seeds() -> dict[str, bytes]:
    base = gradient(24, 16)
    frames = [gradient(24, 16), gradient(24, 16).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "png": image_bytes(base, "PNG"),
        "png-rgba": image_bytes(base.convert("RGBA"), "PNG"),
        "png-p": image_bytes(base.convert("P"), "PNG"),
        "jpeg": image_bytes(base, "JPEG", quality=80),
        "jpeg-progressive": image_bytes(base, "JPEG", progressive=True),
        "gif": image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": image_bytes(base, "WEBP", quality=80),
        "webp-lossless": image_bytes(base.convert("RGBA"), "WEBP", lossless=True),
        "bmp": image_bytes(base, "BMP"),
        "tiff": image_bytes(base, "TIFF", compression="tiff_deflate"),
    }


SEEDS = _seeds()


def decode_within_timeout(data: bytes) -> None:
    """decode(data); only the service's own errors may escape, and it must not hang."""
    future = _pool.submit(decode, data, LIMITS)
    try:
        img = future.result(timeout=TIMEOUT_S)
    except (UnsupportedImage, PayloadTooLarge):
        return
    except concurrent.futures.TimeoutError:
        pytest.fail(f"decode hung for over {TIMEOUT_S}s on {len(data)} bytes: {data[:64]!r}")
    assert img.mode in ("RGB", "RGBA")
    assert 1 <= img.width <= LIMITS.max_side and 1 <= img.height <= LIMITS.max_side
    assert img.width * img.height <= LIMITS.max_pixels


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid seed file with a few bytes overwritten, inserted, deleted or cut."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "int32"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "int32" and len(data) >= at + 4:
            # Header fields (sizes, offsets, counts) are 16/32-bit ints: hit the extremes.
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[at : at + 4] = struct.pack(">I", value)
    return bytes(data)


FUZZ = settings(
    max_examples=300,
    deadline=None,  # the per-example timeout above bounds time; CI machines are noisy
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples on every run: a failure reproduces
)


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    decode_within_timeout(data)


@FUZZ
@given(st.sampled_from(sorted({data[:12] for data in SEEDS.values()})), st.binary(max_size=2048))
def test_magic_then_garbage(magic: bytes, rest: bytes) -> None:
    """A real format's signature followed by garbage reaches that format's plugin."""
    decode_within_timeout(magic + rest)


@FUZZ
@given(mutated())
def test_mutated_valid_images(data: bytes) -> None:
    decode_within_timeout(data)


def _png_with_ihdr(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height", "error"),
    [
        (0, 0, UnsupportedImage),
        (0, 10, UnsupportedImage),
        (30_000, 30_000, PayloadTooLarge),
        (50_000, 1, PayloadTooLarge),
        (0x7FFFFFFF, 0x7FFFFFFF, PayloadTooLarge),
        (10, 10, UnsupportedImage),  # too little pixel data: truncated
    ],
)
def test_crafted_png_headers(width: int, height: int, error: type[Exception]) -> None:
    """Header sizes are checked before any pixel is decoded."""
    with pytest.raises(error):
        decode(_png_with_ihdr(width, height), LIMITS)


def test_seeds_decode() -> None:
    for name, data in SEEDS.items():
        img = decode(data, LIMITS)
        assert img.size == (24, 16), name


def test_animated_gif_gives_first_frame() -> None:
    # The second frame is the first mirrored: its top-left pixel is the first's top-right.
    img = decode(SEEDS["gif"], LIMITS)
    first = gradient(24, 16)
    left, right = first.getpixel((0, 0)), first.getpixel((23, 0))
    got = img.getpixel((0, 0))
    assert sum(abs(a - b) for a, b in zip(got, left, strict=True)) < sum(
        abs(a - b) for a, b in zip(got, right, strict=True)
    )
