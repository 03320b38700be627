"""Bad input corpus against the running service: each case's status and error code.

Every case is followed by a good request that must still get a 200: one bad upload
never breaks the service. Every error body is checked for leaks (tracebacks,
server paths, library versions) with the same check the security tests use.
"""

from __future__ import annotations

import functools
import io
import re
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageCms

from conftest import FIXTURES, Service, gradient, image_bytes

pytestmark = pytest.mark.e2e

CAR = FIXTURES / "car-1.jpg"
MAX_UPLOAD = 25 * 1024 * 1024
GOOD = image_bytes(gradient(64, 48), "PNG")

# What an error body or header must never show: a traceback, a source or
# server path, a Python/library name with a version.
LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|/work/|/home/|/tmp/|site-packages|"
    r"(python|uvicorn|starlette|fastapi|ray|pillow|onnxruntime)[/ ]?\d",
    re.IGNORECASE,
)


def assert_no_leak(response: httpx.Response) -> None:
    server = response.headers.get("server", "")
    assert not re.search(r"\d", server), f"Server header shows a version: {server!r}"
    assert not LEAKS.search(response.text), response.text[:500]
    for name, value in response.headers.items():
        assert not LEAKS.search(value), f"header {name}: {value!r}"


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    error: dict[str, str] = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert_no_leak(response)
    return error


@functools.cache
def _bomb() -> bytes:
    """A real 30000x30000 1-bit PNG: ~110 KB on the wire, 900 megapixels decoded."""
    side = 30000
    row = b"\0" * (1 + side // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_size(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _corrupt_png_header() -> bytes:
    data = bytearray(GOOD)
    data[16:24] = b"\xff" * 8  # IHDR width/height, CRC now wrong
    return bytes(data)


def _corrupt_jpeg_header() -> bytes:
    data = bytearray(CAR.read_bytes())
    data[2:40] = bytes(range(38))  # SOI kept, the segments after it garbled
    return bytes(data)


def _exif_rotated() -> bytes:
    """80x60 pixels stored, EXIF orientation 6: shown as 60x80."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(gradient(80, 60), "JPEG", exif=exif.tobytes())


def _icc_profiled() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return image_bytes(gradient(80, 60), "PNG", icc_profile=profile)


def _animated(fmt: str) -> bytes:
    frames = [gradient(80, 60), gradient(80, 60).transpose(Image.Transpose.ROTATE_180)]
    return image_bytes(
        frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0
    )


def _sixteen_bit() -> bytes:
    return image_bytes(
        Image.fromarray(np.asarray(gradient(80, 60, "L")).astype(np.uint16) * 257), "PNG"
    )


def _palette_transparent() -> bytes:
    img = gradient(80, 60).convert("P")
    return image_bytes(img, "PNG", transparency=0)


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
    b'height="10"><rect width="10" height="10"/></svg>'
)
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages"
    b"/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@dataclass(frozen=True)
class Case:
    """One request: ``raw`` goes to POST /remove as the body; ``rembg`` uses /api/remove."""

    id: str
    status: int
    code: str | None  # None for a 200
    body: Callable[[], bytes] | None = None
    route: str = "/remove"
    params: dict[str, str] = field(default_factory=dict)
    form: dict[str, str] | None = None  # multipart fields; the body goes in `file`
    headers: dict[str, str] = field(default_factory=dict)
    size: tuple[int, int] | None = None  # X-Width, X-Height of a 200

    def send(self, client: httpx.Client) -> httpx.Response:
        data = self.body() if self.body else None
        if self.form is not None:
            files = {"file": ("upload", data or b"")} if data is not None else None
            return client.post(
                self.route, params=self.params, data=self.form, files=files, headers=self.headers
            )
        return client.post(
            self.route, params=self.params, content=data or b"", headers=self.headers
        )


def _bytes(data: bytes) -> Callable[[], bytes]:
    return lambda: data


CASES: list[Case] = [
    # Not an image, or not a whole one.
    Case("empty-body", 415, "unsupported_image", _bytes(b"")),
    Case("text", 415, "unsupported_image", _bytes(b"hello, this is not an image\n")),
    Case("html", 415, "unsupported_image", _bytes(b"<!doctype html><html><body>x</body></html>")),
    Case("json", 415, "unsupported_image", _bytes(b'{"url": "http://127.0.0.1/x.png"}')),
    Case("truncated-jpeg", 415, "unsupported_image", lambda: CAR.read_bytes()[:3000]),
    Case(
        "truncated-png",
        415,
        "unsupported_image",
        lambda: image_bytes(gradient(200, 150), "PNG")[:400],
    ),
    Case("corrupt-png-header", 415, "unsupported_image", _corrupt_png_header),
    Case("corrupt-jpeg-header", 415, "unsupported_image", _corrupt_jpeg_header),
    Case("png-magic-only", 415, "unsupported_image", _bytes(b"\x89PNG\r\n\x1a\n")),
    Case("zero-size-png", 415, "unsupported_image", lambda: _png_with_size(0, 0)),
    # Formats that are refused on purpose: documents and vector images.
    Case("svg", 415, "unsupported_image", _bytes(SVG)),
    Case("pdf", 415, "unsupported_image", _bytes(PDF)),
    Case("eps", 415, "unsupported_image", _bytes(EPS)),
    Case("ico", 415, "unsupported_image", lambda: image_bytes(gradient(32, 32), "ICO")),
    # Limits: pixels, sides and bytes.
    Case("bomb-30000x30000", 413, "payload_too_large", _bomb),
    Case(
        "strip-50000x1",
        413,
        "payload_too_large",
        lambda: image_bytes(Image.new("L", (50000, 1)), "PNG"),
    ),
    Case(
        "header-claims-2^31-side",
        413,
        "payload_too_large",
        lambda: _png_with_size(0x7FFFFFFF, 0x7FFFFFFF),
    ),
    Case("body-over-25MiB", 413, "payload_too_large", lambda: b"\0" * (MAX_UPLOAD + 1)),
    Case(
        "multipart-over-25MiB",
        413,
        "payload_too_large",
        lambda: b"\0" * (MAX_UPLOAD + 1),
        route="/api/remove",
        form={},
    ),
    # Malformed requests and options.
    Case(
        "multipart-garbage",
        400,
        "bad_parameter",
        _bytes(b"--xyz\r\nnot a part\r\n"),
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    ),
    Case(
        "multipart-no-boundary",
        400,
        "bad_parameter",
        _bytes(b"--a\r\n\r\n--a--\r\n"),
        headers={"content-type": "multipart/form-data"},
    ),
    Case("api-remove-raw-body", 400, "bad_parameter", _bytes(GOOD), route="/api/remove"),
    Case(
        "api-remove-no-file-field",
        400,
        "bad_parameter",
        None,
        route="/api/remove",
        form={"model": "u2netp"},
    ),
    Case(
        "bgc-word",
        400,
        "bad_parameter",
        _bytes(GOOD),
        route="/api/remove",
        params={"bgc": "red"},
        form={},
    ),
    Case(
        "bgc-out-of-range",
        400,
        "bad_parameter",
        _bytes(GOOD),
        route="/api/remove",
        params={"bgc": "0,0,0,256"},
        form={},
    ),
    Case("bgcolor-short", 400, "bad_parameter", _bytes(GOOD), params={"bgcolor": "1,2"}),
    Case(
        "af-300",
        400,
        "bad_parameter",
        _bytes(GOOD),
        route="/api/remove",
        form={"a": "true", "af": "300"},
    ),
    Case("ab-negative", 400, "bad_parameter", _bytes(GOOD), route="/api/remove", form={"ab": "-1"}),
    Case(
        "ae-too-big", 400, "bad_parameter", _bytes(GOOD), route="/api/remove", form={"ae": "1000"}
    ),
    Case(
        "threshold-not-int",
        400,
        "bad_parameter",
        _bytes(GOOD),
        params={"alpha_matting_foreground_threshold": "abc"},
    ),
    Case("bool-garbage", 400, "bad_parameter", _bytes(GOOD), params={"only_mask": "maybe"}),
    Case("format-gif", 400, "bad_parameter", _bytes(GOOD), params={"format": "gif"}),
    Case("unknown-param", 400, "bad_parameter", _bytes(GOOD), params={"url": "http://x/"}),
    Case(
        "extras-model-path",
        400,
        "bad_parameter",
        _bytes(GOOD),
        route="/api/remove",
        form={"extras": '{"model_path": "/etc/passwd"}'},
    ),
    Case(
        "unknown-model-rembg",
        404,
        "unknown_model",
        _bytes(GOOD),
        route="/api/remove",
        form={"model": "u2net"},
    ),
    Case(
        "unknown-model-path",
        404,
        "unknown_model",
        _bytes(GOOD),
        params={"model": "../../etc/passwd"},
    ),
    # WebP cannot hold a side over 16383 px: refused from the header, before the work.
    Case(
        "webp-wider-than-16383",
        413,
        "payload_too_large",
        lambda: image_bytes(Image.new("L", (16384, 2)), "PNG"),
        params={"format": "webp"},
    ),
    # Unusual but valid images: answered.
    Case(
        "1x1", 200, None, lambda: image_bytes(Image.new("RGB", (1, 1), "red"), "PNG"), size=(1, 1)
    ),
    Case(
        "cmyk-jpeg", 200, None, lambda: image_bytes(gradient(80, 60, "CMYK"), "JPEG"), size=(80, 60)
    ),
    Case("16-bit-png", 200, None, _sixteen_bit, size=(80, 60)),
    Case("palette-png", 200, None, _palette_transparent, size=(80, 60)),
    Case("la-png", 200, None, lambda: image_bytes(gradient(80, 60, "LA"), "PNG"), size=(80, 60)),
    Case("animated-gif", 200, None, lambda: _animated("GIF"), size=(80, 60)),
    Case("animated-webp", 200, None, lambda: _animated("WEBP"), size=(80, 60)),
    Case("exif-rotated-jpeg", 200, None, _exif_rotated, size=(60, 80)),
    Case("icc-profile-png", 200, None, _icc_profiled, size=(80, 60)),
    Case("bmp", 200, None, lambda: image_bytes(gradient(80, 60), "BMP"), size=(80, 60)),
    Case("tiff", 200, None, lambda: image_bytes(gradient(80, 60), "TIFF"), size=(80, 60)),
    Case(
        "rembg-api-1x1",
        200,
        None,
        lambda: image_bytes(Image.new("RGB", (1, 1)), "PNG"),
        route="/api/remove",
        form={"model": "u2netp"},
        size=(1, 1),
    ),
]


def check(case: Case, response: httpx.Response) -> None:
    if case.status == 200:
        assert response.status_code == 200, response.text[:500]
        assert response.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(response.content))
        assert img.mode == "RGBA"
        if case.size is not None:
            assert img.size == case.size
            assert (int(response.headers["x-width"]), int(response.headers["x-height"])) == (
                case.size
            )
        return
    assert case.code is not None
    error = assert_json_error(response, case.status, case.code)
    if case.code == "unknown_model":
        assert "available: u2netp" in error["message"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(service: Service, case: Case) -> None:
    with service.client() as client:
        check(case, case.send(client))
        # The service is unharmed: the next good request is answered.
        good = client.post("/remove", content=GOOD)
        assert good.status_code == 200, good.text[:500]


def test_corpus_is_large_enough() -> None:
    assert len([c for c in CASES if c.status != 200]) >= 30


def _raw_request(url: str, head: str, chunks: list[bytes], timeout_s: float = 60) -> bytes:
    """Send a request head and some body chunks; return what the server answers.

    The body is never finished, so an answer proves the server refused it early
    instead of reading it all.
    """
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: read what it said
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
        return answer


def _head(extra: str) -> str:
    return f"POST /remove HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n{extra}\r\n"


def test_declared_length_over_limit_is_refused_before_the_body(service: Service) -> None:
    """Content-Length above the limit: 413 after 64 KiB sent of a declared 30 MiB."""
    answer = _raw_request(
        service.url, _head(f"Content-Length: {30 * 1024 * 1024}\r\n"), [b"\0" * 65536]
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_chunked_body_over_limit_is_refused_without_its_end(service: Service) -> None:
    """No Content-Length: counted while read, 413 once past the limit, end never sent."""
    piece = b"\0" * (1024 * 1024)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    answer = _raw_request(service.url, _head("Transfer-Encoding: chunked\r\n"), [chunk] * 27)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    with httpx.Client(base_url=service.url, timeout=60) as client:
        assert client.post("/remove", content=GOOD).status_code == 200


def test_chunked_body_within_limit_is_served(service: Service) -> None:
    def body() -> Any:
        data = CAR.read_bytes()
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    with httpx.Client(base_url=service.url, timeout=60) as client:
        response = client.post("/remove", content=body())
    assert response.status_code == 200, response.text[:300]
    assert response.headers["x-width"] == "480"
