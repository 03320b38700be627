"""The model deployment's class in this process: load once, live reconfigure that
never takes the serving session down, a batch that isolates its failures, health.

``ModelServer`` is Serve's deployment class; here its underlying class runs with
the real ONNX Runtime session on CPU and no Serve around it (the replica's CPUs
are passed in). Only ``test_one_bad_image_never_fails_its_batchmates`` fakes
the model, to make one image of a batch fail.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from deployments.errors import InferenceFailed, ServiceError
from deployments.infer import OnnxModel
from deployments.model_server import ModelServer, Pending, Resources
from deployments.models import EMBEDDED
from deployments.settings import LiveModelConfig

SERVER: Any = ModelServer.func_or_class  # type: ignore[attr-defined]
IMAGE = np.zeros((320, 320, 3), dtype=np.uint8)


def loaded_server(**user_config: Any) -> Any:
    server = SERVER({"name": "u2netp"}, 0.0, resources=Resources(cpus=2))
    asyncio.run(server.reconfigure(LiveModelConfig(**user_config).model_dump(mode="json")))
    return server


@pytest.fixture(scope="module")
def server() -> Any:
    return loaded_server(max_batch_size=2)


def test_loads_once_from_its_user_config(tmp_path: Path) -> None:
    fresh = SERVER({"name": "u2netp"}, 0.0, resources=Resources(cpus=2))
    assert fresh.loaded is None  # __init__ loads nothing: the first reconfigure does
    copy = tmp_path / "u2netp-v1.onnx"
    shutil.copy(EMBEDDED["u2netp"], copy)
    asyncio.run(fresh.reconfigure({"model_path": str(copy), "model_version": "v1"}))
    info = asyncio.run(fresh.info())
    assert (info["file"], info["model_version"], info["ready"]) == ("u2netp-v1.onnx", "v1", True)


def test_first_load_failure_fails_the_replica(tmp_path: Path) -> None:
    fresh = SERVER({"name": "u2netp"}, 0.0, resources=Resources(cpus=2))
    with pytest.raises(ServiceError, match="not found"):
        asyncio.run(fresh.reconfigure({"model_path": str(tmp_path / "missing.onnx")}))


@pytest.mark.parametrize(
    ("user_config", "error"),
    [
        ({"model_path": "/no/such/model.onnx", "model_version": "v2"}, "ModelUnavailable"),
        ({"max_batch_size": 4, "max_batchsize": 8}, "ValidationError"),
    ],
)
def test_a_failed_live_reconfigure_keeps_the_serving_session(
    tmp_path: Path, user_config: dict[str, Any], error: str
) -> None:
    server = loaded_server(max_batch_size=2)
    before = server.loaded
    asyncio.run(server.reconfigure(user_config))
    assert server.loaded is before  # the same session still serves
    info = asyncio.run(server.info())
    assert info["last_reconfigure_error"]["error"] == error
    assert info["max_batch_size"] == 2 and info["model_version"] is None
    # No server path in what /models shows.
    assert "/no/such" not in str(info)
    mask = asyncio.run(server._run(server.model.predict, [IMAGE]))[0]
    assert mask.shape == (320, 320)
    # A good config afterwards applies and clears the error.
    asyncio.run(server.reconfigure({"max_batch_size": 4}))
    info = asyncio.run(server.info())
    assert info["last_reconfigure_error"] is None and info["batch_shapes"] == [1, 2, 4]


class FailsOnMarkedImage:
    """FAKE model: the real session's output for every image, except that a batch
    holding an image whose first pixel is 255 raises, as a broken input would.
    ``error`` picks what it raises: one of ours, or an arbitrary exception."""

    def __init__(self, real: Any, error: Exception) -> None:
        self.real, self.error = real, error
        self.batches: list[int] = []

    def predict(self, images: list[npt.NDArray[np.uint8]]) -> list[npt.NDArray[np.uint8]]:
        self.batches.append(len(images))
        if any(image[0, 0, 0] == 255 for image in images):
            raise self.error
        result: list[npt.NDArray[np.uint8]] = self.real.predict(images)
        return result


@pytest.mark.parametrize("error", [InferenceFailed("inference failed"), ValueError("bad shape")])
def test_one_bad_image_never_fails_its_batchmates(server: Any, error: Exception) -> None:
    good = [np.full((320, 320, 3), v, dtype=np.uint8) for v in (10, 90, 170)]
    bad = np.full((320, 320, 3), 255, dtype=np.uint8)
    fake = FailsOnMarkedImage(server.loaded.model, error)
    server.loaded = type(server.loaded)(fake, server.loaded.path, server.loaded.version)  # type: ignore[arg-type]
    items = [Pending(image, 0.0) for image in (good[0], bad, good[1], good[2])]
    try:
        results = asyncio.run(server.run_batch(items))
    finally:
        server.loaded = type(server.loaded)(fake.real, server.loaded.path, server.loaded.version)
    assert len(results) == 4  # one result per request, always
    assert isinstance(results[1], InferenceFailed)
    for i, image in zip((0, 2, 3), good, strict=True):
        assert np.array_equal(results[i], fake.real.predict([image])[0])
    # The batch failed once, then each image ran alone.
    assert fake.batches[:5] == [4, 1, 1, 1, 1]


def test_healthy_while_a_batch_runs_and_probes_when_idle(server: Any) -> None:
    probes: list[int] = []
    real = server.loaded.model

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def predict(self, images: list[npt.NDArray[np.uint8]]) -> Any:
            probes.append(len(images))
            return real.predict(images)

    server.loaded = type(server.loaded)(Counting(), server.loaded.path, server.loaded.version)  # type: ignore[arg-type]
    try:
        server.last_ok = 0.0
        with server.model_free.batch():  # a batch is running: busy is healthy, no probe
            asyncio.run(server.check_health())
        assert probes == []
        # idle, and no batch for long: one probe image
        asyncio.run(server.check_health())
        assert probes == [1]
        asyncio.run(server.check_health())  # proven just now: no second probe
        assert probes == [1]
    finally:
        server.loaded = type(server.loaded)(real, server.loaded.path, server.loaded.version)


def test_an_idle_replica_whose_session_fails_is_unhealthy(server: Any) -> None:
    real = server.loaded.model

    class Broken:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def predict(self, images: list[npt.NDArray[np.uint8]]) -> Any:
            raise RuntimeError("the session can no longer run")

    server.loaded = type(server.loaded)(Broken(), server.loaded.path, server.loaded.version)  # type: ignore[arg-type]
    try:
        server.last_ok = 0.0  # idle, and no batch for long: the probe runs and fails
        with pytest.raises(RuntimeError, match="no longer run"):
            asyncio.run(server.check_health())
    finally:
        server.loaded = type(server.loaded)(real, server.loaded.path, server.loaded.version)


def test_the_warm_up_is_the_first_health_checks_proof() -> None:
    # Serve checks a new replica's health right after its first reconfigure: the
    # warm-up has just run the session, so that check runs no image of its own.
    fresh = SERVER({"name": "u2netp"}, 0.0, resources=Resources(cpus=2))
    runs: list[int] = []
    original = OnnxModel._run

    def counting(self: OnnxModel, batch: Any) -> Any:
        runs.append(len(batch))
        return original(self, batch)

    OnnxModel._run = counting  # type: ignore[method-assign]
    try:
        asyncio.run(fresh.reconfigure({"max_batch_size": 2}))
        warm_up = list(runs)
        asyncio.run(fresh.check_health())
    finally:
        OnnxModel._run = original  # type: ignore[method-assign]
    assert warm_up == [2, 1]
    assert runs == warm_up


def test_every_session_run_happens_on_the_one_inference_thread() -> None:
    """Three batches of 2 at once (``run_batch``, what @serve.batch calls: its queue
    needs a replica) and a health probe: every run of the real session on the same
    thread, never two at once."""
    server = loaded_server(max_batch_size=2)
    real = server.loaded.model
    threads: set[int] = set()
    running = [0, 0]  # now, most at once
    sizes: list[int] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def predict(self, images: list[npt.NDArray[np.uint8]]) -> Any:
            threads.add(threading.get_ident())
            sizes.append(len(images))
            running[0] += 1
            running[1] = max(running)
            try:
                return real.predict(images)
            finally:
                running[0] -= 1

    server.loaded = type(server.loaded)(Recording(), server.loaded.path, server.loaded.version)

    pair = [Pending(IMAGE, 0.0), Pending(IMAGE, 0.0)]

    async def traffic() -> None:
        server.last_ok = 0.0  # no batch for long: the probe runs an image
        await asyncio.gather(server.check_health(), *(server.run_batch(pair) for _ in range(3)))

    asyncio.run(traffic())
    assert sorted(sizes) == [1, 2, 2, 2]  # the probe's image and the three batches
    assert len(threads) == 1 and running[1] == 1, (threads, running)


def test_malformed_input_is_refused_before_the_batch(server: Any) -> None:
    with pytest.raises(InferenceFailed, match=r"takes uint8 \(320, 320, 3\)"):
        asyncio.run(server.predict(np.zeros((10, 10, 3), dtype=np.uint8)))
    with pytest.raises(InferenceFailed, match="float32"):
        asyncio.run(server.predict(np.zeros((320, 320, 3), dtype=np.float32)))
