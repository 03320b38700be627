"""`rembg-serve` without a service: the output plan, `fetch`, the console script, `remove`
with nothing to talk to (tests/service/test_cli_service.py has it against a service)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path, PurePosixPath
from typing import ClassVar

import pyarrow.fs as pafs
import pytest

from conftest import FIXTURES, free_port, gradient
from deployments.cli import main
from deployments.files import (
    FileJob,
    PlanRefused,
    output_is_whole,
    output_names,
    partial_name,
    partial_of,
    plan,
    remove_leftovers,
    write_atomic,
)

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


@pytest.mark.parametrize(
    ("inputs", "names"),
    [
        (["a.jpg", "b.png", "sub/c.webp"], ["a.png", "b.png", "sub/c.png"]),
        (["a.jpg", "a.png"], ["a.jpg.png", "a.png.png"]),
        # a.jpg.webp's short name is a.jpg's full one: only a.jpg.webp moves on.
        (["a.jpg", "a.png", "a.jpg.webp"], ["a.jpg.png", "a.png.png", "a.jpg.webp.png"]),
        # One file on a case-insensitive disk: a hash of the path tells them apart.
        (["A.jpg", "a.jpg"], ["A.jpg.cf5a5bbb.png", "a.jpg.56ceeb90.png"]),
        # An output that is also a folder of outputs.
        (["x.jpg", "x.png/y.jpg"], ["x.jpg.png", "x.png/y.png"]),
    ],
)
def test_output_names_never_clash_in_the_whole_set(inputs: list[str], names: list[str]) -> None:
    got = [n.as_posix() for n in output_names([PurePosixPath(i) for i in inputs], ".png")]
    assert got == names
    folded = [n.casefold() for n in got]
    assert len(set(folded)) == len(folded)
    assert not set(folded) & {
        p.as_posix().casefold() for n in got for p in PurePosixPath(n).parents
    }


def test_plan_refuses_two_folders_with_a_same_named_file(tmp_path: Path) -> None:
    for root, name in [("a", "x.jpg"), ("b", "x.jpg"), ("b", "y.jpg")]:
        (tmp_path / root).mkdir(exist_ok=True)
        gradient().save(tmp_path / root / name)
    with pytest.raises(PlanRefused, match=r"a/x\.jpg and .*b/x\.jpg have the same path"):
        plan([tmp_path / "a", tmp_path / "b"], tmp_path / "out", ".png")
    (tmp_path / "b" / "x.jpg").rename(tmp_path / "b" / "x.png")
    jobs = plan(
        [tmp_path / "a", tmp_path / "b", tmp_path / "a" / "x.jpg"], tmp_path / "out", ".png"
    )
    # The file given twice (in a and alone) is sent once.
    assert sorted(j.target.name for j in jobs) == ["x.jpg.png", "x.png.png", "y.png"]


def test_plan_with_the_output_folder_inside_or_around_the_input(tmp_path: Path) -> None:
    photos = _tree(tmp_path)
    (photos / "out").mkdir()
    gradient().save(photos / "out" / "old.png")
    # An output folder inside the input: its files are not inputs.
    assert not [j for j in plan([photos], photos / "out", ".png") if "out" in j.source.parts]
    # The input inside the output folder: outputs beside it...
    jobs = plan([photos / "sub"], photos, ".png")
    assert jobs == [FileJob(photos / "sub" / "c.webp", photos / "c.png")]
    # ...unless one would land inside the input (over an input, or read by the next run).
    with pytest.raises(PlanRefused, match="inside an input"):
        plan([photos], photos, ".png")
    (photos / "sub" / "sub").mkdir()
    gradient().save(photos / "sub" / "sub" / "d.jpg")
    with pytest.raises(PlanRefused, match="inside an input"):
        plan([photos / "sub"], photos, ".png")
    with pytest.raises(PlanRefused, match="inside an input"):
        plan([photos / "b.png"], photos, ".png")


def test_an_empty_or_torn_output_is_not_whole(tmp_path: Path) -> None:
    png, webp = tmp_path / "x.png", tmp_path / "x.webp"
    gradient().save(png)
    gradient().save(webp)
    assert output_is_whole(png) and output_is_whole(webp)
    assert not output_is_whole(tmp_path / "missing.png")
    for path in (png, webp):
        data = path.read_bytes()
        for torn in (b"", data[:-1], b"garbage" + data[7:]):
            path.write_bytes(torn)
            assert not output_is_whole(path), (path.name, len(torn))


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
    target.parent.mkdir(parents=True)
    # A user's file that happens to end in .part is not ours.
    (target.parent / "out.png.part").write_bytes(b"a user's download")
    write_atomic(str(target), b"first", fs)
    write_atomic(str(target), b"second, longer", fs)
    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png", "out.png.part"]
    # A write that fails half-way leaves neither a temporary nor a new output.
    with pytest.raises(TypeError):
        write_atomic(str(target), "not bytes", fs)  # type: ignore[arg-type]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png", "out.png.part"]
    assert target.read_bytes() == b"second, longer"


def test_remove_leftovers_deletes_only_our_temporaries_of_these_outputs(tmp_path: Path) -> None:
    ours = tmp_path / partial_name("a.png")
    other_run = tmp_path / partial_name("z.png")  # not an output of this plan
    users = [
        tmp_path / "notes.part",
        tmp_path / ".a.png.part",
        tmp_path / ".a.png.x.rembg-serve.part",
    ]
    for path in [ours, other_run, *users]:
        path.write_bytes(b"x")
    assert partial_of(ours.name) == "a.png" and partial_of("notes.part") is None
    assert remove_leftovers([tmp_path / "a.png", tmp_path / "b" / "c.png"]) == 1
    assert not ours.exists() and other_run.exists() and all(p.exists() for p in users)


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


class _BadWidth(http.server.BaseHTTPRequestHandler):
    """Answers POST /remove with 200 and a non-integer X-Width; counts the bodies."""

    received: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        self.received.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("X-Width", "wide")
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"png")

    def log_message(self, *args: object) -> None:
        pass


def test_remove_makes_a_bad_answer_and_a_huge_file_their_files_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    gradient().save(photos / "small.png")
    (photos / "huge.jpg").write_bytes(b"\xff" * 5000)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadWidth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        args = ["remove", str(photos), "-o", str(tmp_path / "o"), "--url", url, "-q"]
        assert main([*args, "--max-upload-bytes", "4000"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    printed = capsys.readouterr()
    assert "0 done, 0 already there, 2 failed" in printed.out
    assert "huge.jpg: 413 payload_too_large: the file is 5000 bytes" in printed.err
    assert "small.png: ValueError" in printed.err
    # Only the small file was sent; nothing was written.
    assert _BadWidth.received == [(photos / "small.png").stat().st_size]
    assert not (tmp_path / "o").exists()


def test_remove_refuses_same_named_files_of_two_folders_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
        gradient().save(tmp_path / root / "x.jpg")
    url = f"http://127.0.0.1:{free_port()}"  # nothing there: no request may be made
    out = tmp_path / "out"
    assert (
        main(["remove", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--url", url])
        == 2
    )
    assert "have the same path in their folders (x.jpg)" in capsys.readouterr().err
    assert not out.exists()


_POOLED_MODELS = {
    "default": "u2netp",
    "models": [{"name": "u2netp", "ready": True}],
    "refine": {"warm": True},
    "pool": {
        "models": ["pool-a", "pool-b"],
        "replica": {
            "replica": "Pool#x1",
            "pid": 42,
            "budget_bytes": 3 * 2**30,
            "used_bytes": 600 * 2**20,
            "loaded": ["pool-a"],
            "models": [
                {"name": "pool-a", "loaded": True, "bytes": 600 * 2**20, "leases": 1, "loads": 2},
                {"name": "pool-b", "loaded": False, "evictions": 1, "failures": 3, "error": "E"},
            ],
        },
    },
}


class _PooledService(http.server.BaseHTTPRequestHandler):
    """Answers /healthz and /models as a service with two pooled models would."""

    models: ClassVar[dict[str, object]] = _POOLED_MODELS

    def do_GET(self) -> None:
        if self.path == "/healthz":
            health = {"u2netp": True, "pool-a": True, "pool-b": True}
            body = json.dumps({"status": "ok", "models": health}).encode()
        else:
            body = json.dumps(self.models).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _health_of(handler: type[http.server.BaseHTTPRequestHandler], *flags: str) -> None:
    """``rembg-serve health`` against ``handler`` on a free port; it must say healthy."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["health", "--url", url, *flags]) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_health_lists_the_pooled_models(capsys: pytest.CaptureFixture[str]) -> None:
    _health_of(_PooledService)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "  u2netp (default): warm",
        "  pool, replica Pool#x1 (pid 42): 600 MiB of 3072 MiB used",
        "    pool-a: loaded on Pool#x1, 600 MiB, 1 in use, loads 2, hits 0, evictions 0, "
        "failures 0",
        "    pool-b: not loaded, loads 0, hits 0, evictions 1, failures 3, last load failed: E",
    ]
    # --json: the report as /models sent it, beside the health.
    _health_of(_PooledService, "--json")
    printed = json.loads(capsys.readouterr().out)
    assert printed["pool"] == _POOLED_MODELS["pool"]
    assert printed["health"] == {"u2netp": True, "pool-a": True, "pool-b": True}


class _NoPoolReplica(_PooledService):
    models: ClassVar[dict[str, object]] = {
        **_POOLED_MODELS,
        "pool": {"models": ["pool-a", "pool-b"], "reason": "TimeoutError"},
    }


def test_health_names_the_pooled_models_when_no_pool_replica_answers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _health_of(_NoPoolReplica)
    out = capsys.readouterr().out
    assert "  pool: no replica answered (TimeoutError); pooled: pool-a, pool-b" in out
