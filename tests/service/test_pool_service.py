"""The model pool through `serve run`: four u2netp copies under a budget that holds two.

The copies are u2netp's file under other names and paths (no other weights can be
fetched here), each charged a declared size, so that "holds two" does not hang
on a measurement; a file that is no model stands for a broken one. Every answer
must equal the dedicated u2netp's for the same image, pixel for pixel. The same
service takes a pooled model through `rembg-serve` and the Python client.
"""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, Service, free_port, serve_config, start_test_service
from deployments.bench.harness import stop_process
from deployments.cli import main
from deployments.client import Client, Options
from deployments.models import resolve_model_file

pytestmark = pytest.mark.e2e

POOLED = ("pool-a", "pool-b", "pool-c", "pool-d")
BROKEN = "pool-broken"
# Charged per model; the budget holds two of them, not three.
MODEL_BYTES = 600_000_000
BUDGET = 2 * MODEL_BYTES + MODEL_BYTES // 2
IMAGE = (FIXTURES / "car-1.jpg").read_bytes()


def pool_config(directory: Path) -> dict[str, Any]:
    models: list[dict[str, Any]] = []
    for name in POOLED:
        copy = directory / name / "weights.onnx"
        copy.parent.mkdir()
        shutil.copyfile(resolve_model_file("u2netp"), copy)
        models.append({"name": name, "model": "u2netp", "path": str(copy), "bytes": MODEL_BYTES})
    broken = directory / "broken.onnx"
    broken.write_bytes(b"not an onnx model " * 1000)
    models.append({"name": BROKEN, "model": "u2netp", "path": str(broken), "bytes": MODEL_BYTES})
    return {"models": models, "budget_bytes": BUDGET, "retry_failed_s": 60}


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("pool")
    # One CPU each for the dedicated model and the pool: both fit a 2-core machine.
    config = serve_config(free_port(), args={"pool": pool_config(tmp), "num_cpus": 1})
    # Batches of up to 2: each load warms shapes 1 and 2 only (a miss costs less).
    config["applications"][0]["deployments"].append(
        {"name": "Pool", "user_config": {"max_batch_size": 2}, "max_ongoing_requests": 16}
    )
    running = start_test_service(tmp, config)
    try:
        yield running
    finally:
        stop_process(running.process)


def pixels(body: bytes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.asarray(Image.open(io.BytesIO(body)))


def pool_state(client: httpx.Client) -> dict[str, Any]:
    report = client.get("/models").json()
    replica: dict[str, Any] = report["pool"]["replica"]
    return replica


def test_pooled_models_answer_as_the_dedicated_model_within_the_budget(pooled: Service) -> None:
    with pooled.client(timeout=120) as client:
        health = client.get("/healthz").json()
        assert health["models"] == dict.fromkeys(["u2netp", *POOLED, BROKEN], True)
        dedicated = client.post("/remove", params={"model": "u2netp"}, content=IMAGE)
        assert dedicated.status_code == 200
        expected = pixels(dedicated.content)

        seen: list[tuple[int, int]] = []
        stop = threading.Event()

        def watch() -> None:
            # Samples what the replica holds while the requests run.
            with pooled.client() as watcher:
                while not stop.is_set():
                    state = pool_state(watcher)
                    seen.append((len(state["loaded"]), state["used_bytes"]))

        def call(name: str) -> tuple[str, httpx.Response]:
            return name, client.post("/remove", params={"model": name}, content=IMAGE)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            # Round robin one at a time (each a miss: least recently used goes),
            # then all four at once, twice each (hits and misses together).
            answers = [call(name) for name in POOLED + POOLED[:2]]
            with ThreadPoolExecutor(8) as threads:
                answers += list(threads.map(call, POOLED * 2))
        finally:
            stop.set()
            watcher.join()
        for name, response in answers:
            assert response.status_code == 200, (name, response.text)
            assert response.headers["x-model"] == name
            assert np.array_equal(pixels(response.content), expected), name
        assert seen and max(n for n, _ in seen) <= 2, seen
        assert max(used for _, used in seen) <= BUDGET, seen

        state = pool_state(client)
        assert len(state["loaded"]) <= 2 and state["used_bytes"] <= BUDGET
        # A CPU replica: the budget counts its host memory (RSS).
        assert state["budget_memory"] == "host" and state["budget_bytes"] == BUDGET
        models = {m["name"]: m for m in state["models"]}
        assert sum(m["loads"] for m in models.values()) >= 6
        assert sum(m["evictions"] for m in models.values()) >= 4
        for name in POOLED:
            assert models[name]["loads"] >= 1 and models[name]["measured_bytes"] > 0
            assert models[name]["load_s"] > 0
            assert models[name]["bytes"] == MODEL_BYTES


def test_a_broken_pooled_model_fails_alone_and_an_unknown_one_is_404(pooled: Service) -> None:
    with pooled.client(timeout=120) as client:
        for _ in range(2):  # the second is refused without another load
            broken = client.post("/remove", params={"model": BROKEN}, content=IMAGE)
            assert broken.status_code == 503, broken.text
            assert broken.headers["content-type"] == "application/json"
            assert broken.json()["error"]["code"] == "model_load_failed"
            assert int(broken.headers["retry-after"]) >= 1
            assert "/" not in broken.json()["error"]["message"]
        assert client.post("/remove", params={"model": POOLED[0]}, content=IMAGE).status_code == 200
        assert client.post("/remove", content=IMAGE).status_code == 200  # the default
        unknown = client.post("/remove", params={"model": "pool-zzz"}, content=IMAGE)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "unknown_model"
        assert all(name in unknown.json()["error"]["message"] for name in POOLED)
        models = {m["name"]: m for m in pool_state(client)["models"]}
        assert models[BROKEN]["failures"] == 1, models[BROKEN]
        assert models[BROKEN]["error"] == "ModelUnavailable" and not models[BROKEN]["loaded"]


def test_a_pooled_model_through_the_cli_and_the_client(
    pooled: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pooled name is named as a dedicated one (`--model`, ``Options(model=)``) and
    cuts the same pixels; `health` and ``models()`` show where it is loaded."""
    name = POOLED[0]
    car = tmp_path / "car.jpg"
    shutil.copy(FIXTURES / "car-1.jpg", car)
    out = tmp_path / "out"
    args = ["remove", str(car), "-o", str(out), "--url", pooled.url, "-q"]
    assert main([*args, "--model", name]) == 0
    with Client(pooled.url) as client:
        cut = client.remove(car, Options(model=name))
        dedicated = client.remove(car, Options(model="u2netp"))
        models = client.models()
    assert (cut.model, dedicated.model) == (name, "u2netp")
    assert cut.data == dedicated.data == (out / "car.png").read_bytes()
    assert models.pool is not None and models.pool.replica is not None
    info = next(m for m in models.pool.replica.models if m.name == name)
    # Loaded by the CLI's request (or before it), so the client's was a hit.
    assert (info.loaded, info.bytes, info.failures) == (True, MODEL_BYTES, 0)
    assert info.loads >= 1 and info.hits >= 1, info
    capsys.readouterr()
    assert main(["health", "--url", pooled.url]) == 0
    printed = capsys.readouterr().out
    replica = models.pool.replica.replica
    mib = f"{MODEL_BYTES / 2**20:.0f} MiB"
    line = f"    {name}: loaded on {replica}, {mib}, loads {info.loads}, hits {info.hits}"
    assert line in printed, printed
