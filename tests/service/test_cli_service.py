"""`rembg-serve` against the running service: remove (folders, options), health, a real
cut-out. A pooled model through the CLI: tests/service/test_pool_service.py."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (
    FIXTURES,
    Service,
    free_port,
    gradient,
    image_bytes,
    load_image,
)
from deployments.cli import main


def _tree(root: Path) -> Path:
    """The folder tests/unit/test_cli.py plans: photos/{a.jpg, a.png, b.png, sub/c.webp}
    and a text file."""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("a.jpg", "a.png", "b.png", "sub/c.webp"):
        gradient().save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    return photos


def test_remove_a_folder_resumes_and_reports_failures(
    service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = _tree(tmp_path)
    (photos / "broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    args = ["remove", str(photos), "-o", str(out), "--url", service.url, "-c", "3", "-q"]

    assert main(args) == 1
    printed = capsys.readouterr()
    assert "4 done, 0 already there, 1 failed" in printed.out
    assert "FAILED" in printed.err and "broken.png" in printed.err
    assert "415 unsupported_image" in printed.err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.jpg.png", "a.png.png", "b.png", "sub/c.png"]
    cut = load_image(out / "sub" / "c.png")
    assert cut.mode == "RGBA" and cut.size == (64, 48)

    # Rerun: the four outputs are skipped, only the fixed file is sent.
    (photos / "broken.png").write_bytes(image_bytes(gradient(32, 32)))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(args) == 0
    assert "1 done, 4 already there, 0 failed" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert load_image(out / "broken.png").size == (32, 32)


def test_remove_passes_options(service: Service, tmp_path: Path) -> None:
    car = tmp_path / "car.jpg"
    shutil.copy(FIXTURES / "car-1.jpg", car)
    args = ["remove", str(car), "-o", str(tmp_path / "out"), "--url", service.url, "-q"]
    assert main([*args, "--only-mask"]) == 0
    assert load_image(tmp_path / "out" / "car.png").mode == "L"
    assert main([*args, "--format", "webp", "--bgcolor", "0,0,255,255"]) == 0
    webp = load_image(tmp_path / "out" / "car.webp")
    assert webp.format == "WEBP"
    # A blue background wherever the car was cut away.
    corner = np.asarray(webp.convert("RGB"))[:10, :10].reshape(-1, 3).mean(axis=0)
    assert corner[2] > 200 and corner[0] < 60


def test_health_is_zero_only_when_healthy(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--url", service.url]) == 0
    printed = capsys.readouterr().out
    assert "healthy" in printed and "u2netp (default): warm" in printed
    assert main(["health", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"]) == 2


def test_result_is_a_cutout_of_the_car(service: Service, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        main(["remove", str(FIXTURES / "car-1.jpg"), "-o", str(out), "--url", service.url, "-q"])
        == 0
    )
    alpha = np.asarray(Image.open(io.BytesIO((out / "car-1.png").read_bytes())).getchannel("A"))
    # The background is cut away, the car kept (u2netp's mask is soft: >= 240 counts).
    assert (alpha == 0).mean() > 0.1 and (alpha >= 240).mean() > 0.1


def test_remove_into_its_own_input_folder_and_an_empty_output_redone(
    service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.png"):
        gradient().save(photos / name)
    out = photos / "out"
    args = ["remove", str(photos), "-o", str(out), "--url", service.url, "-q"]
    assert main(args) == 0
    assert "2 done, 0 already there" in capsys.readouterr().out
    # A rerun reads neither the outputs inside the input folder nor writes out/out/.
    assert main(args) == 0
    assert "0 done, 2 already there, 0 failed" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.png", "b.png"]
    # An output a power loss left empty is not done: it is sent again.
    (out / "a.png").write_bytes(b"")
    assert main(args) == 0
    assert "1 done, 1 already there, 0 failed" in capsys.readouterr().out
    assert load_image(out / "a.png").size == (64, 48)
