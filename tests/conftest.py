"""Shared fixtures: images, the embedded model, rembg's reference, a running service.

Ray tests start a small local Ray (num_cpus set, its own ports) and always shut
it down; the service tests start `serve run` on a copy of serve_config.yaml whose
only change is a free port (deployments.bench.harness, shared with the benchmark).
"""

from __future__ import annotations

import io
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.bench.harness import (
    Running,
    compare,
    free_port,
    rembg_home,
    rembg_reference,
    running_service,
    serve_config,
    start_service,
    stop_process,
    write_config,
)
from deployments.infer import OnnxModel
from deployments.models import resolve_model_file, spec_for
from deployments.runtime import RuntimeConfig

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
SHARED_IMAGES = sorted(FIXTURES.glob("*-1.jpg"))
OUTPUT = ROOT / "test-output"

# A test that starts `serve run` (through these fixtures) is an end-to-end test.
SERVICE_FIXTURES = {
    "service",
    "secured",
    "observed",
    "small_service",
    "soak_service",
    "one_hop_service",
}

Service = Running

__all__ = ["FIXTURES", "ROOT", "SHARED_IMAGES", "Service", "free_port", "serve_config"]


# Tiers by folder (the markers say the same, and CI selects by them): tests/unit runs
# no Ray, no Serve, no service and no session of a real model; tests/service the rest
# of the fast suite; tests/slow only `slow` and `bench` tests. Collection fails when
# a test's folder and its marks or fixtures disagree.
TIERS = ("unit", "service", "slow")
NOT_UNIT_FIXTURES = SERVICE_FIXTURES | {"u2netp", "reference_outputs"}
NOT_UNIT_MARKS = {"serve", "e2e", "slow", "bench"}
SLOW_MARKS = {"slow", "bench"}


def tier(item: pytest.Item) -> str | None:
    """The tier folder ``item`` lives in (tests/<tier>/...), or None."""
    parts = Path(item.path).resolve().relative_to(ROOT).parts
    return parts[1] if len(parts) > 2 and parts[0] == "tests" and parts[1] in TIERS else None


def tier_errors(item: pytest.Item) -> list[str]:
    marks = {mark.name for mark in item.iter_markers()}
    fixtures = set(getattr(item, "fixturenames", ()))
    where = tier(item)
    if where is None:
        return [f"not in a tier folder (tests/{{{','.join(TIERS)}}}/)"]
    if where == "unit":
        return [f"uses fixture {f!r}" for f in sorted(fixtures & NOT_UNIT_FIXTURES)] + [
            f"marked {m!r}" for m in sorted(marks & NOT_UNIT_MARKS)
        ]
    if where == "service" and marks & SLOW_MARKS:
        return [f"marked {m!r}: it belongs in tests/slow" for m in sorted(marks & SLOW_MARKS)]
    if where == "slow" and not marks & SLOW_MARKS:
        return ["in tests/slow without a 'slow' or 'bench' mark"]
    return []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
    errors = [f"{item.nodeid}: {e}" for item in items for e in tier_errors(item)]
    if errors:
        raise pytest.UsageError("tests in the wrong tier folder:\n  " + "\n  ".join(errors))


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    """What collection cannot see: a unit test that starts Ray fails."""
    yield
    ray = sys.modules.get("ray")
    if tier(request.node) == "unit" and ray is not None and ray.is_initialized():
        pytest.fail("this test started Ray: it belongs in tests/service or tests/slow")


def image_bytes(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def load_image(path: Path) -> Image.Image:
    """The image at ``path``, read whole and its file closed."""
    with Image.open(path) as img:
        img.load()
    return img


def gradient(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    """A small synthetic image with structure (not flat), in any mode."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1
    ).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(rgb)


def progressive_jpeg(side: int = 2000, extra_scans: int = 0) -> bytes:
    """A flat progressive JPEG (10 scans) with its last scan repeated ``extra_scans``
    times before EOI (a scan bomb): libjpeg decodes every copy over the whole image."""
    data = image_bytes(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", progressive=True)
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra_scans + b"\xff\xd9"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_chunks(png: bytes, *chunks: bytes) -> bytes:
    """``png`` with ``chunks`` inserted after IHDR (8-byte signature + 25-byte IHDR)."""
    return png[:33] + b"".join(chunks) + png[33:]


def ztxt(key: bytes, text: bytes) -> bytes:
    """A zTXt chunk: ``text`` deflated under ``key``."""
    return png_chunk(b"zTXt", key + b"\0\0" + zlib.compress(text, 9))


@pytest.fixture(scope="session")
def reference_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """rembg.remove(data, session=new_session("u2netp")) on every shared image."""
    home = rembg_home(tmp_path_factory.mktemp("rembg"))
    return rembg_reference({p.name: p.read_bytes() for p in SHARED_IMAGES}, home)


@pytest.fixture(scope="session")
def u2netp() -> OnnxModel:
    return OnnxModel(
        resolve_model_file("u2netp"), spec_for("u2netp"), RuntimeConfig(intra_op_threads=2), 4
    )


def assert_parity(name: str, ours: bytes, reference: bytes) -> None:
    """The decoded RGBA equals rembg's pixel for pixel; both are saved when not."""
    parity = compare(ours, reference)
    if not parity.identical:
        OUTPUT.mkdir(exist_ok=True)
        (OUTPUT / f"parity-ours-{name}.png").write_bytes(ours)
        (OUTPUT / f"parity-rembg-{name}.png").write_bytes(reference)
    assert parity.identical, (
        f"{name}: differs from rembg's output (saved in test-output/): {parity}"
    )


def start_test_service(tmp: Path, config: dict[str, object] | None = None) -> Service:
    """`serve run` of ``config`` (default: serve_config.yaml on a free port)."""
    path = write_config(tmp, config or serve_config(free_port()))
    return start_service(path, tmp / "serve.log")


@contextmanager
def service_with_own_ray(
    config: dict[str, object], env: dict[str, str] | None = None
) -> Iterator[Service]:
    """`serve run` of ``config`` with a Ray temp dir of its own (RAY_TMPDIR; short, as
    Ray's socket paths must stay < 108 bytes), its config and console log in it, so
    that its replicas' log files are at ``service.log.parent / "ray" /
    "session_latest"``; the dir is removed after."""
    temp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    try:
        with running_service(temp, config, env={**(env or {}), "RAY_TMPDIR": str(temp)}) as running:
            yield running
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_test_service(tmp_path_factory.mktemp("service"))
    try:
        yield running
    finally:
        stop_process(running.process)
