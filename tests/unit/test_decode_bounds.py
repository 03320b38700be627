"""The decoder's bounds on work and memory that the pixel limits do not see.

Progressive-JPEG scan bombs (cost = scans x pixels), PNG text chunks inflated into
``info`` (zTXt bombs), and NaN or infinities in float images.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from conftest import (
    FIXTURES,
    gradient,
    image_bytes,
    png_chunk,
    progressive_jpeg,
    with_chunks,
    ztxt,
)
from deployments.decode import MAX_JPEG_SCANS, Limits, decode, jpeg_scans, probe
from deployments.errors import UnsupportedImage


def test_scans_are_counted_by_walking_segments() -> None:
    photo = Image.open(FIXTURES / "car-1.jpg")
    assert jpeg_scans(image_bytes(photo, "JPEG"), MAX_JPEG_SCANS) == 1
    progressive = image_bytes(photo, "JPEG", progressive=True)
    assert jpeg_scans(progressive, MAX_JPEG_SCANS) == 10
    assert jpeg_scans(image_bytes(photo.convert("L"), "JPEG", progressive=True), 64) == 6
    # FF DA inside a segment's payload (a comment here; an EXIF thumbnail's own scan
    # in practice) is not a scan of this image: a bytes.count would say 201.
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 200) + b"\xff\xda" * 100
    assert jpeg_scans(progressive[:2] + comment + progressive[2:], 64) == 10
    # Nor is anything after EOI (MPO's second image, trailing data).
    assert jpeg_scans(progressive + progressive, 64) == 10


def test_counting_stops_past_the_bound() -> None:
    bomb = progressive_jpeg(64, extra_scans=100_000)
    started = time.perf_counter()
    assert jpeg_scans(bomb, MAX_JPEG_SCANS) == MAX_JPEG_SCANS + 1
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize("step", [probe, decode])
def test_scan_bomb_is_refused_before_decoding(step: object) -> None:
    bomb = progressive_jpeg(2000, extra_scans=3000)  # 3010 scans: ~7 s to decode
    started = time.perf_counter()
    with pytest.raises(UnsupportedImage, match=f"over {MAX_JPEG_SCANS} scans"):
        step(bomb, Limits())  # type: ignore[operator]
    assert time.perf_counter() - started < 0.5


def test_thousands_of_empty_segments_are_refused_quickly() -> None:
    """The walk is bounded too: 25 MiB of 4-byte comments would cost it seconds."""
    jpeg = progressive_jpeg(64)
    comments = b"\xff\xfe\x00\x02" * 1_000_000
    bomb = jpeg[:-2] + comments + b"\xff\xda" * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    started = time.perf_counter()
    with pytest.raises(UnsupportedImage, match="segments"):
        probe(bomb, Limits())
    assert time.perf_counter() - started < 0.2


def test_jpeg_at_the_scan_bound_decodes() -> None:
    at_bound = progressive_jpeg(64, extra_scans=MAX_JPEG_SCANS - 10)
    assert jpeg_scans(at_bound, MAX_JPEG_SCANS) == MAX_JPEG_SCANS
    assert decode(at_bound, Limits()).getpixel((5, 5)) == decode(
        progressive_jpeg(64), Limits()
    ).getpixel((5, 5))
    with pytest.raises(UnsupportedImage, match="scans"):
        decode(progressive_jpeg(64, extra_scans=MAX_JPEG_SCANS - 9), Limits())


def test_ztxt_bomb_is_skipped_unread() -> None:
    png = image_bytes(Image.new("RGB", (1, 1)), "PNG")
    # 63 chunks of 1 MiB inflated: Pillow alone held 63 MiB and spent ~0.65 s.
    bomb = with_chunks(png, *[ztxt(b"Comment", b"a" * (1 << 20))] * 63)
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        started = time.perf_counter()
        img = decode(bomb, Limits())
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "Comment" not in img.info
    assert elapsed < 0.2
    assert peak < 2 * 1024 * 1024


def test_kept_text_is_bounded() -> None:
    """The keys orientation is read from are inflated, but at most 4 MiB in all."""
    png = image_bytes(Image.new("RGB", (1, 1)), "PNG")
    bomb = with_chunks(png, *[ztxt(b"Raw profile type exif", b"0" * (1 << 20))] * 63)
    started = time.perf_counter()
    with pytest.raises(UnsupportedImage):
        decode(bomb, Limits())
    assert time.perf_counter() - started < 0.5


def test_orientation_in_png_text_is_still_applied() -> None:
    """ImageMagick writes EXIF as hex in a zTXt; Pillow (and so rembg) rotates by it."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    raw = exif.tobytes()
    text = f"\nexif\n{len(raw):8d}\n".encode() + raw.hex().encode() + b"\n"
    png = image_bytes(gradient(40, 20), "PNG")
    rotated = decode(with_chunks(png, ztxt(b"Raw profile type exif", text)), Limits())
    assert rotated.size == (20, 40)
    # And XMP's tiff:Orientation in an iTXt.
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    itxt = png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp)
    assert decode(with_chunks(png, itxt), Limits()).size == (20, 40)


def test_text_is_not_kept_in_the_decoded_image() -> None:
    png = image_bytes(gradient(8, 8), "PNG")
    text = png_chunk(b"tEXt", b"workflow\0" + b"{}" * 100_000)
    img = decode(with_chunks(png, text), Limits())
    assert "workflow" not in img.info
    assert np.array_equal(np.asarray(img), np.asarray(gradient(8, 8)))


def test_nan_and_infinity_in_a_float_image() -> None:
    values = np.tile(np.linspace(0, 2, 50, dtype=np.float32), (40, 1))
    values[0, :5], values[1, :5], values[2, :5] = np.nan, np.inf, -np.inf
    tiff = io.BytesIO()
    Image.fromarray(values).save(tiff, "TIFF")
    gray = np.asarray(decode(tiff.getvalue(), Limits()))[..., 0]
    assert gray[0, :5].tolist() == [0] * 5  # NaN: black
    assert gray[1, :5].tolist() == [255] * 5  # +inf: white
    assert gray[2, :5].tolist() == [0] * 5  # -inf: black
    # The finite values keep their scale: the largest finite one is white.
    assert gray[3, -1] == 255 and gray[3, 25] == round(255 * values[3, 25] / 2)


def test_tiff_with_float_strip_offsets_is_a_415() -> None:
    """Pillow raises TypeError on it (seek to a float); found by fuzzing decode."""
    data = bytearray(image_bytes(gradient(8, 8), "TIFF"))
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, at + 2, 11)  # typed FLOAT instead of LONG
    with pytest.raises(UnsupportedImage, match="truncated or corrupt"):
        decode(bytes(data), Limits())
