"""`rembg-serve`: the output plan, and each subcommand against the running service."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, Service, free_port, gradient, image_bytes, load_image
from deployments.cli import Job, main, plan

SCRIPT = Path(sys.executable).parent / "rembg-serve"


def _tree(root: Path) -> Path:
    """photos/{a.jpg, a.png, b.png, notes.txt, sub/c.webp}"""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    gradient().save(photos / "a.jpg")
    gradient().save(photos / "a.png")
    gradient().save(photos / "b.png")
    (photos / "notes.txt").write_text("not an image")
    gradient().save(photos / "sub" / "c.webp")
    return photos


def test_plan_walks_folders_keeps_layout_and_avoids_clashes(tmp_path: Path) -> None:
    photos = _tree(tmp_path)
    single = FIXTURES / "car-1.jpg"
    jobs = plan([photos, single], tmp_path / "out", ".png")
    out = tmp_path / "out"
    assert jobs == [
        Job(photos / "a.jpg", out / "a.jpg.png"),
        Job(photos / "a.png", out / "a.png.png"),
        Job(photos / "b.png", out / "b.png"),
        Job(photos / "sub" / "c.webp", out / "sub" / "c.png"),
        Job(single, out / "car-1.png"),
    ]
    # Same inputs, same plan: what makes a rerun resumable.
    assert plan([photos, single], out, ".png") == jobs


def test_plan_refuses_a_missing_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        plan([tmp_path / "nope"], tmp_path / "out", ".png")


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


def test_remove_against_no_service_fails_after_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "g.png"
    gradient().save(image)
    url = f"http://127.0.0.1:{free_port()}"
    code = main(
        ["remove", str(image), "-o", str(tmp_path / "o"), "--url", url, "--retries", "1", "-q"]
    )
    assert code == 1
    assert "ConnectError" in capsys.readouterr().err
    assert not (tmp_path / "o" / "g.png").exists()


def test_health_is_zero_only_when_healthy(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--url", service.url]) == 0
    printed = capsys.readouterr().out
    assert "healthy" in printed and "u2netp (default): warm" in printed
    assert main(["health", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"]) == 2


def test_fetch_the_embedded_model_and_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch", "u2netp"]) == 0
    assert "embedded" in capsys.readouterr().out
    assert main(["fetch", "no-such-model"]) == 1
    assert "not supported" in capsys.readouterr().err


def test_fetch_reads_the_models_of_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "applications:\n  - args:\n      models:\n        - name: u2netp\n"
        "        - {name: u2net, path: /models/u2net.onnx}\n"
    )
    # u2net has an explicit path: nothing to fetch for it.
    assert main(["fetch", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "u2netp: embedded in the package, nothing to fetch"
    ]


def test_console_script_and_bench_are_wired() -> None:
    assert SCRIPT.is_file(), "run `pip install -e .` to install the rembg-serve script"
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert all(cmd in done.stdout for cmd in ("fetch", "remove", "health", "bench"))
    # `bench` hands its arguments to deployments.bench's own parser.
    bench = subprocess.run(
        [str(SCRIPT), "bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert bench.returncode == 0, bench.stderr
    assert "usage:" in bench.stdout and "bench" in bench.stdout


def test_result_is_a_cutout_of_the_car(service: Service, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        main(["remove", str(FIXTURES / "car-1.jpg"), "-o", str(out), "--url", service.url, "-q"])
        == 0
    )
    alpha = np.asarray(Image.open(io.BytesIO((out / "car-1.png").read_bytes())).getchannel("A"))
    # The background is cut away, the car kept (u2netp's mask is soft: >= 240 counts).
    assert (alpha == 0).mean() > 0.1 and (alpha >= 240).mean() > 0.1
