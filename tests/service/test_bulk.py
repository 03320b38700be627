"""Bulk mode (``rembg-serve batch``) on a small local Ray: a folder end to end, the
endpoint's pixels, a killed run resumed, the files a run must not lose (a user's
``.part`` files, broken outputs redone), the pixel budget, any per-image error a
failure line.

Ray Data runs the real pipeline here: the embedded model in an actor, the
service's stages, files read and written on disk.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from conftest import (
    FIXTURES,
    ROOT,
    SHARED_IMAGES,
    Service,
    assert_parity,
    gradient,
    image_bytes,
    load_image,
)
from deployments.bulk import BulkConfig, Cutter, Job, run
from deployments.bulk_report import FAILURES_NAME, iter_failures
from deployments.cli import main
from deployments.decode import Limits
from deployments.models import resolve_model_file
from deployments.options import CutoutOptions, Fidelity
from deployments.pipeline import ImageSettings
from deployments.settings import AppSettings, ModelConfig


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """A small local Ray for this module; its GCS address."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _pixels(data: bytes) -> tuple[str, tuple[int, int], np.ndarray]:
    with Image.open(io.BytesIO(data)) as img:
        return img.mode, img.size, np.asarray(img)


def _outputs(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_folder_end_to_end(local_ray: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for sub in ("a", "b", "bad", "big"):
        (src / sub).mkdir(parents=True)
    shutil.copy(FIXTURES / "car-1.jpg", src / "a" / "photo.jpg")
    shutil.copy(FIXTURES / "plants-1.jpg", src / "b" / "photo.jpg")
    # Same stem as a/photo.jpg in the same folder: both keep their full names.
    (src / "a" / "photo.png").write_bytes(image_bytes(gradient(120, 90, "RGBA")))
    (src / "bad" / "corrupt.jpg").write_bytes((FIXTURES / "car-1.jpg").read_bytes()[:300])
    (src / "bad" / "notes.txt").write_text("not an image, not listed")
    # 2400 x 2000 = 4.8 MP, over the run's 4 MP limit (a few KiB on disk).
    (src / "big" / "huge.png").write_bytes(image_bytes(Image.new("RGB", (2400, 2000), "white")))
    settings = AppSettings(limits=Limits(max_pixels=4_000_000), pixel_budget=4_000_000)
    config = BulkConfig(settings=settings, progress=False)

    summary = run(str(src), str(out), config)

    assert (summary.done, summary.skipped, summary.failed) == (3, 0, 2)
    assert _outputs(out) == {"a/photo.jpg.png", "a/photo.png.png", "b/photo.png", FAILURES_NAME}
    for name, source in [("a/photo.jpg.png", "a/photo.jpg"), ("b/photo.png", "b/photo.jpg")]:
        mode, size, alpha = _pixels((out / name).read_bytes())
        assert mode == "RGBA" and size == load_image(src / source).size
        assert 0 < alpha[..., 3].mean() < 255  # a cut-out, neither empty nor opaque
    failures = {Path(f["path"]).name: f for f in iter_failures(str(out))}
    assert set(failures) == {"corrupt.jpg", "huge.png"}
    assert failures["corrupt.jpg"]["status"] == 415
    assert failures["huge.png"]["status"] == 413 and "pixels" in failures["huge.png"]["message"]
    assert summary.megapixels > 0 and summary.images_per_s > 0
    assert summary.actor_rss_mib and all(p >= f > 0 for f, p in summary.actor_rss_mib.values())

    # Run again: the outputs are there, only the failures are tried again.
    again = run(str(src), str(out), config)
    assert (again.done, again.skipped, again.failed) == (0, 3, 2)


@pytest.mark.parametrize(
    ("options", "fidelity"),
    [
        (CutoutOptions(), None),
        (CutoutOptions(bgcolor=(20, 40, 200, 255)), None),
        (CutoutOptions(), "fast"),
    ],
    ids=["default", "bgc", "fast"],
)
def test_bulk_pixels_are_the_endpoints(
    local_ray: str,
    service: Service,
    tmp_path: Path,
    options: CutoutOptions,
    fidelity: Fidelity | None,
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for path in SHARED_IMAGES:
        shutil.copy(path, src / path.name)
    # The settings the test service runs with: serve_config.yaml's.
    settings = AppSettings.from_serve_config(ROOT / "serve_config.yaml")
    config = BulkConfig(settings=settings, options=options, fidelity=fidelity, progress=False)
    summary = run(str(src), str(out), config)
    assert summary.done == len(SHARED_IMAGES) and summary.failed == 0

    params = {"bgcolor": ",".join(map(str, options.bgcolor))} if options.bgcolor else {}
    if fidelity is not None:
        params["fidelity"] = fidelity
    with service.client() as client:
        for path in SHARED_IMAGES:
            response = client.post("/remove", content=path.read_bytes(), params=params)
            assert response.status_code == 200
            bulk = (out / path.with_suffix(".png").name).read_bytes()
            assert_parity(f"bulk-{path.stem}", bulk, response.content)


def test_a_killed_run_resumes_without_redoing_anything(local_ray: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    photos = [load_image(p).convert("RGB").resize((400, 300)) for p in SHARED_IMAGES]
    for i in range(24):
        folder = src / f"set{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        photos[i % len(photos)].save(folder / f"img{i:02d}.jpg", quality=90)
    command = [sys.executable, "-m", "deployments.cli", "batch", str(src), str(out)]
    driver = subprocess.Popen(
        [*command, "--address", local_ray, "--batch-size", "2", "-q"],
        env={**os.environ, "RAY_AUTH_MODE": "token"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while len(list(out.rglob("*.png"))) < 4:
            assert driver.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no outputs within 180 s"
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # Ray stops the dead driver's actors; wait until no more outputs appear.
    before: dict[Path, int] = {}
    while True:
        time.sleep(3)
        now = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
        if now == before:
            break
        before = now
    assert 4 <= len(before) < 24, "the kill came too late to test a resume"
    for path in before:
        with Image.open(path) as img:
            img.load()  # whole: a killed run leaves no half-written output

    resumed = run(str(src), str(out), BulkConfig(progress=False))

    assert (resumed.done, resumed.skipped, resumed.failed) == (24 - len(before), len(before), 0)
    assert {p: p.stat().st_mtime_ns for p in before} == before, "a finished image was redone"
    assert len(list(out.rglob("*.png"))) == 24
    assert not list(out.rglob("*.part"))


def test_batch_keeps_user_files_redoes_broken_outputs_and_stays_within_its_budget(
    local_ray: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    photo = load_image(FIXTURES / "car-1.jpg").convert("RGB").resize((400, 300))  # 0.12 MP
    for name in ("a", "b", "c", "d", "sub/e", "blocked/f"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        photo.save(src / f"{name}.jpg", quality=90)
    (out / "sub").mkdir(parents=True)
    (out / "notes.part").write_text("a user's notes")
    (out / "sub" / "dl.part").write_text("a download in progress")
    (out / "a.png").write_bytes(b"")  # left empty by a power loss
    (out / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    (out / "blocked").write_text("a file where a folder of outputs would go")
    # A budget of 0.2 MP: a batch of 4 (0.48 MP) must be decoded a part at a time.
    config = tmp_path / "serve_config.yaml"
    config.write_text(
        "applications:\n  - import_path: deployments.serve_app:build_app\n    args:\n"
        "      pixel_budget: 200000\n      limits: {max_pixels: 150000}\n"
    )
    args = ["batch", str(src), str(out), "--address", local_ray, "--config", str(config)]

    assert main([*args, "--batch-size", "4", "-q"]) == 1

    printed = capsys.readouterr().out
    assert "5 done, 0 already there, 1 failed" in printed
    assert "at most 0.1 MP decoded at once by a call" in printed, printed
    assert (out / "notes.part").read_text() == "a user's notes"
    assert (out / "sub" / "dl.part").read_text() == "a download in progress"
    for name in ("a", "b", "c", "d", "sub/e"):
        assert load_image(out / f"{name}.png").size == (400, 300)
    # The write that could not be made is that image's failure line.
    (failure,) = iter_failures(str(out))
    assert failure["path"].endswith("blocked/f.jpg") and failure["status"] == 500
    assert "could not read or write" in failure["message"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".rembg-serve.part")]


def test_a_model_error_of_any_kind_is_its_images_failure(local_ray: str, tmp_path: Path) -> None:
    # The model cannot be made to fail on demand: its predict is replaced by one
    # that raises an error that is not InferenceFailed (a fault injected here).
    sources = []
    for name in ("a", "b"):
        sources.append(str(tmp_path / f"{name}.png"))
        gradient(64, 48).save(sources[-1])
    settings = AppSettings()
    job = Job(
        input_uri=str(tmp_path),
        output_uri=str(tmp_path / "out"),
        options=CutoutOptions(),
        fmt="png",
        image=ImageSettings.of(settings, "exact"),
    )
    cutter = Cutter(ModelConfig(name="u2netp").model_dump(mode="json"), 0.0, 2, 1, job)

    def broken(images: object) -> object:
        raise ValueError("shapes do not match")

    cutter.model.predict = broken  # type: ignore[method-assign,assignment]
    targets = [str(tmp_path / "out" / f"{name}.png") for name in ("a", "b")]
    rows = cutter({"source": np.array(sources, dtype=object), "target": np.array(targets)})
    assert list(rows["status"]) == [500, 500]
    assert list(rows["message"]) == ["ValueError", "ValueError"]
    assert not (tmp_path / "out").exists()
    assert cutter.budget.free == settings.pixel_budget


def test_a_pooled_model_runs_as_a_dedicated_one(local_ray: str, tmp_path: Path) -> None:
    """A run names a pooled model (u2netp's file under another name and path): its
    actors load that file with u2netp's constants, and cut the dedicated model's pixels."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(FIXTURES / "car-1.jpg", src / "car.jpg")
    copy = tmp_path / "copy" / "weights.onnx"
    copy.parent.mkdir()
    shutil.copyfile(resolve_model_file("u2netp"), copy)
    pool = {"models": [{"name": "pool-a", "model": "u2netp", "path": str(copy)}]}
    settings = AppSettings.model_validate({"pool": {**pool, "budget_bytes": 10**9}})
    outputs: dict[str, bytes] = {}
    for name in ("pool-a", "u2netp"):
        out = tmp_path / name
        summary = run(str(src), str(out), BulkConfig(settings, model=name, progress=False))
        assert (summary.done, summary.failed) == (1, 0), name
        outputs[name] = (out / "car.png").read_bytes()
    assert outputs["pool-a"] == outputs["u2netp"]
