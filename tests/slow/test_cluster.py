"""Cluster autoscaling: nodes come for the replicas that need them and go when idle.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``) plays the cloud: its
"nodes" are extra raylets on this machine that declare a GPU. The head has
none, as on KubeRay (config/rayservice.yaml) and the cluster launcher
(config/cluster.yaml). No CUDA runs here, so the replicas are a probe with the
model replica's resource options from ``build_app`` (ModelServer itself would
refuse a GPU it cannot use; see tests/unit/test_gpu_path.py). On CPU nodes the
real app runs: a node launched for the model replica serves the first cut-out.

The head runs under its own short temp dir and in its own process group, and
teardown kills that group only: never `ray stop`, which would stop every Ray on
the machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from ray import serve
from test_scaling import GpuProbe, model_actor_options, replica_reports, wait_for

from conftest import FIXTURES, free_port
from deployments.bench.cluster import (
    IDLE_TIMEOUT_S,
    connect,
    fake_cluster,
    gpu_nodes,
    new_node,
    pids_under,
)
from deployments.runtime import use_gpu_for
from deployments.serve_app import build_app

pytestmark = pytest.mark.slow


def test_gpu_nodes_launch_for_replicas_and_go_when_idle(tmp_path: Path) -> None:
    log = tmp_path / "head.log"
    with fake_cluster(log) as cluster:
        connect(cluster, log)
        assert gpu_nodes() == []
        # With no GPU node up yet `auto` would choose the CPU path: a cluster
        # that scales GPU nodes from zero sets `device: gpu`.
        assert not use_gpu_for("auto", ray.cluster_resources().get("GPU", 0))
        options = model_actor_options(build_app({"device": "gpu", "num_gpus": 0.5}))
        assert options == {"num_cpus": 1, "num_gpus": 0.5}

        # One proxy, on the head: every fake node shares this machine's ports.
        serve.start(
            proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()}
        )
        started = time.monotonic()
        probe = GpuProbe.options(num_replicas=4, ray_actor_options=options)
        handle = serve.run(probe.bind(), name="probe", route_prefix=None)
        up_s = time.monotonic() - started
        # Four half-GPU replicas: two GPU nodes, launched for them.
        assert len(gpu_nodes()) == 2
        reports = replica_reports(handle, want=4)
        assert {r["node"] for r in reports.values()} == set(gpu_nodes())
        assert all(r["gpu_ids"] == [0] for r in reports.values())

        # Load gone: down to one warm replica; its node stays, the other goes.
        started = time.monotonic()
        serve.run(probe.options(num_replicas=1).bind(), name="probe", route_prefix=None)
        down_s = wait_for(
            lambda: len(gpu_nodes()) == 1, 300, "idle GPU node removed", lambda: str(ray.nodes())
        )
        (survivor,) = gpu_nodes()
        (last,) = replica_reports(handle, want=1).values()
        assert last["node"] == survivor and last["gpu_ids"] == [0]
        time.sleep(IDLE_TIMEOUT_S * 2)
        assert gpu_nodes() == [survivor]  # a node with a replica is never idle
        print(f"2 GPU nodes up with 4 replicas in {up_s:.1f}s; idle node gone in {down_s:.1f}s")
    assert pids_under(cluster.temp_dir) == []


def test_a_new_node_comes_for_the_model_and_serves_it(tmp_path: Path) -> None:
    """The cold path of a cluster that scales from no workers: a CPU-less head,
    the real app deployed, a node launched for the model replica, the first
    cut-out answered. Timed from the deployment to that first 200."""
    image = (FIXTURES / "car-1.jpg").read_bytes()
    result = new_node(image, tmp_path / "head.log")
    assert result["workers_before"] == 0 and result["workers_after"] == 1, result
    assert result["status"] == 200, result
    assert 0 < result["app_running_s"] < result["first_cutout_s"], result
    print(
        f"a node launched for the model replica: app running in {result['app_running_s']}s, "
        f"first cut-out {result['first_cutout_s']}s"
    )
