"""`rembg-serve` without a service: the output plan, `fetch`, the console script, `remove`
with nothing to talk to (tests/service/test_cli_service.py has it against a service)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from conftest import FIXTURES, free_port, gradient
from deployments.cli import main
from deployments.files import FileJob, plan, write_atomic

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
        FileJob(photos / "a.jpg", out / "a.jpg.png"),
        FileJob(photos / "a.png", out / "a.png.png"),
        FileJob(photos / "b.png", out / "b.png"),
        FileJob(photos / "sub" / "c.webp", out / "sub" / "c.png"),
        FileJob(single, out / "car-1.png"),
    ]
    # Same inputs, same plan: what makes a rerun resumable.
    assert plan([photos, single], out, ".png") == jobs


def test_plan_refuses_a_missing_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        plan([tmp_path / "nope"], tmp_path / "out", ".png")


@pytest.mark.parametrize("through", ["path", "local fs", "other fs"])
def test_write_atomic_leaves_the_whole_file_and_no_partial(tmp_path: Path, through: str) -> None:
    # "other fs": a pyarrow filesystem that is not the local one, as s3:// is,
    # so that its streams and move are the ones used.
    fs = {
        "path": None,
        "local fs": pafs.LocalFileSystem(),
        "other fs": pafs.SubTreeFileSystem("/", pafs.LocalFileSystem()),
    }[through]
    target = tmp_path / "deep" / "er" / "out.png"
    # A partial file a killed run left behind is overwritten, then renamed away.
    target.parent.mkdir(parents=True)
    (target.parent / "out.png.part").write_bytes(b"half")
    write_atomic(str(target), b"first", fs)
    write_atomic(str(target), b"second, longer", fs)
    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


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
        "applications:\n  - import_path: deployments.serve_app:build_app\n"
        "    args:\n      models:\n        - name: u2netp\n"
        "        - {name: u2net, path: /models/u2net.onnx}\n"
    )
    # u2net has an explicit path: nothing to fetch for it.
    assert main(["fetch", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "u2netp: embedded in the package, nothing to fetch"
    ]


def test_fetch_refuses_a_config_without_this_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("applications:\n  - import_path: other.app:build\n    args: {}\n")
    assert main(["fetch", "--config", str(config)]) == 2
    assert "no application of this service" in capsys.readouterr().err


def test_console_script_is_wired_and_ships_no_benchmark() -> None:
    assert SCRIPT.is_file(), "run `pip install -e .` to install the rembg-serve script"
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert all(cmd in done.stdout for cmd in ("fetch", "remove", "batch", "health"))
    # The benchmark runs from a checkout (python -m deployments.bench), not the shipped CLI.
    bench = subprocess.run([str(SCRIPT), "bench"], capture_output=True, text=True, timeout=60)
    assert bench.returncode == 2 and "invalid choice: 'bench'" in bench.stderr
