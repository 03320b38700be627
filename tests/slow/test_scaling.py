"""Replica autoscaling and fractional-GPU packing through real Ray Serve.

The app is deployed the way an operator does it: serve_config.yaml (edited for a
small test cluster) sent to a running Ray with `serve deploy`, whose dashboard
listens on a free port. No GPU here: the packing test declares a fake one to
Ray and checks the scheduling only (see its docstring).
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve

from conftest import ROOT, free_port, gradient, image_bytes, serve_config
from deployments.bench.harness import Load
from deployments.runtime import use_gpu_for
from deployments.serve_app import build_app

APP = "rembg"
MODEL = "Model_u2netp"
IMAGE = image_bytes(gradient(96, 64))

# Serve pushes autoscaling metrics every 10 s by default; a test cannot wait
# minutes. Set before Ray starts so that the controller and replicas inherit it.
FAST_METRICS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass
class LocalServe:
    """A local Ray with its dashboard on a free port, fed configs by `serve deploy`."""

    url: str
    dashboard: str
    tmp: Path
    deploys: int = 0

    def deploy(self, config: dict[str, Any], timeout_s: float = 600) -> None:
        self.deploys += 1
        path = self.tmp / f"serve_config.{self.deploys}.yaml"
        path.write_text(yaml.safe_dump(config))
        serve_cli = Path(sys.executable).parent / "serve"
        subprocess.run(
            [str(serve_cli), "deploy", "--address", self.dashboard, str(path)],
            check=True,
            cwd=ROOT,
            timeout=120,
            capture_output=True,
        )
        wait_for(lambda: app_status() == "RUNNING", timeout_s, "app RUNNING", serve_state)

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


@contextmanager
def local_serve(tmp: Path, num_cpus: int, num_gpus: int = 0) -> Iterator[LocalServe]:
    saved = {k: os.environ.get(k) for k in FAST_METRICS}
    os.environ.update(FAST_METRICS)
    dashboard_port = free_port()
    try:
        for attempt in range(3):
            dashboard_port = free_port()
            try:
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=dashboard_port,
                )
                break
            except Exception:
                # Ray waits a fixed 30 s for its raylet to register; on a
                # loaded shared box that can run out. Start again.
                ray.shutdown()
                if attempt == 2:
                    raise
        yield LocalServe(url="", dashboard=f"http://127.0.0.1:{dashboard_port}", tmp=tmp)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def edited_config(port: int, **model: Any) -> dict[str, Any]:
    """serve_config.yaml on a free loopback port, CPU replicas of one core each,
    with ``model`` merged into the model deployment's options (None removes one)."""
    return serve_config(
        port,
        args={"device": "cpu", "num_cpus": 1},
        deployments={MODEL: model},
        top={"http_options": {"host": "127.0.0.1"}},
    )


def app_status() -> str | None:
    try:
        app = serve.status().applications.get(APP)
    except Warning:
        raise  # warnings are errors here: one would otherwise look like "not up yet"
    except Exception:
        return None
    # A str-valued enum: compare its value, not its str() ("ApplicationStatus.X").
    return None if app is None else str(getattr(app.status, "value", app.status))


def replicas(deployment: str = MODEL, app: str = APP) -> int:
    """RUNNING replicas of ``deployment``, from the controller's own status."""
    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def serve_state() -> str:
    try:
        return repr(serve.status())
    except Exception as exc:
        return f"serve.status() failed: {exc!r}"


def wait_for(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    state: Callable[[], str] = serve_state,
) -> float:
    """Poll ``check`` until true; seconds taken. The box is shared and slow:
    timeouts are generous and a miss reports the state it saw."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if check():
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{what}: not reached in {timeout_s}s; {state()}")


def remove(client: httpx.Client) -> int:
    return client.post("/remove", content=IMAGE).status_code


def timed_remove(client: httpx.Client) -> float:
    started = time.perf_counter()
    assert remove(client) == 200
    return time.perf_counter() - started


def load(url: str, clients: int) -> Load:
    """``clients`` clients posting a small image until the block ends."""
    return Load(url, {"gradient.png": IMAGE}, clients)


@pytest.mark.slow
def test_burst_scales_model_replicas_up_then_back_to_one_warm(tmp_path: Path) -> None:
    # Four logical CPUs on a 2-core machine: room for three one-CPU model
    # replicas (the ingress reserves none). Scheduling is what is tested here.
    with local_serve(tmp_path, num_cpus=4) as cluster:
        port = free_port()
        cluster.url = f"http://127.0.0.1:{port}"
        cluster.deploy(
            edited_config(
                port,
                user_config={"max_batch_size": 1},
                autoscaling_config={
                    "min_replicas": 1,
                    "max_replicas": 3,
                    "target_ongoing_requests": 2,
                    "upscale_delay_s": 2,
                    "downscale_delay_s": 5,
                },
            )
        )
        assert replicas() == 1
        with cluster.client() as client:
            remove(client)
            steady = statistics.median(timed_remove(client) for _ in range(5))

        counts: list[int] = []
        with load(cluster.url, clients=12) as running:
            grew_s = wait_for(lambda: counts.append(replicas()) or counts[-1] > 1, 300, "scale up")
        statuses = running.statuses()
        assert statuses[200] > 0
        assert set(statuses) == {200}, f"non-200 answers under load: {statuses}"

        # Load is off: Serve comes back down to min_replicas, never below.
        shrank_s = wait_for(lambda: counts.append(replicas()) or counts[-1] == 1, 300, "scale down")
        for _ in range(8):  # and stays there
            counts.append(replicas())
            time.sleep(0.5)
        assert max(counts) > 1 and min(counts) >= 1 and counts[-1] == 1, counts

        with cluster.client() as client:
            first = timed_remove(client)
        print(
            f"steady {steady * 1000:.0f} ms; grew in {grew_s:.1f}s to {max(counts)}; "
            f"back to 1 in {shrank_s:.1f}s; first request after: {first * 1000:.0f} ms"
        )
        # A cold start (load + warm-up of a new session) would take seconds; the
        # warm replica answers about as fast as before. Generous: the box is shared.
        assert first < max(5 * steady, steady + 1.5)


@serve.deployment
class GpuProbe:
    """Stands in for ModelServer where only scheduling can be tested: reports
    the GPU Ray assigned to its replica."""

    def __init__(self) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def __call__(self) -> dict[str, Any]:
        import asyncio

        await asyncio.sleep(0.05)
        return {
            "replica": self.replica,
            "gpu_ids": [int(i) for i in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node": ray.get_runtime_context().get_node_id(),
        }


def model_actor_options(app: serve.Application) -> dict[str, Any]:
    """The model deployment's ray_actor_options, as build_app set them."""
    ingress = app._bound_deployment
    _settings, handles, *_ = ingress.init_args
    (model,) = handles.values()
    options: dict[str, Any] = model._bound_deployment.ray_actor_options
    return options


def replica_reports(handle: Any, want: int, timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    """Call until ``want`` distinct replicas have answered."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        # A bounded wait: a call that never answers fails the test instead of hanging it.
        for report in [r.result(timeout_s=60) for r in [handle.remote() for _ in range(16)]]:
            seen[report["replica"]] = report
    return seen


@pytest.mark.slow
def test_quarter_gpu_replicas_pack_four_to_a_card(tmp_path: Path) -> None:
    """A fake GPU (Ray counts it; nothing runs on it): four replicas with the
    options build_app gives a 0.25-GPU model pack onto it, each assigned GPU 0."""
    with local_serve(tmp_path, num_cpus=8, num_gpus=1):
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        assert use_gpu_for("auto", cluster_gpus)
        options = model_actor_options(build_app({"device": "auto", "num_gpus": 0.25}))
        assert options == {"num_cpus": 1, "num_gpus": 0.25}
        # One hop: the ingress replicas take the model's share (and get the GPU path).
        one_hop = build_app({"device": "auto", "num_gpus": 0.25, "models_in_ingress": True})
        ingress = one_hop._bound_deployment
        assert ingress.ray_actor_options == options
        assert ingress.init_args[1] == {} and ingress.init_args[3] == 0.25
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        # Five replicas asked for: four fit on the card, the fifth waits for a GPU.
        probe = GpuProbe.options(num_replicas=5, ray_actor_options=copy.deepcopy(options))
        (handle,) = serve.run_many(
            [serve.RunTarget(probe.bind(), name="probe", route_prefix=None)],
            wait_for_applications_running=False,
        )
        wait_for(lambda: probe_states().get("RUNNING", 0) == 4, 300, "four replicas up")

        reports = replica_reports(handle, want=4)
        assert len(reports) == 4
        assert all(r["gpu_ids"] == [0] for r in reports.values()), reports
        assert all(r["cuda_visible_devices"] == "0" for r in reports.values())
        assert ray.available_resources().get("GPU", 0) == 0  # the card is full
        time.sleep(3)
        states = probe_states()
        assert states.get("RUNNING", 0) == 4 and sum(states.values()) == 5, states


def probe_states() -> dict[str, int]:
    try:
        status = serve.status().applications["probe"].deployments["GpuProbe"]
    except KeyError:
        return {}
    return {str(k): int(v) for k, v in status.replica_states.items()}
