"""A cluster that scales from no workers, on one machine: Ray's fake multi-node provider.

``RAY_FAKE_CLUSTER=1`` makes Ray's autoscaler play the cloud: its "nodes" are
extra raylets on this machine with the resources their node type declares. The
head runs under its own short temp dir and in its own process group, and
``stop`` kills that group and the nodes it started only: never `ray stop`,
which would stop every Ray on the machine. ``new_node`` times the cold path of
such a cluster: a CPU-less head, the real app deployed, a node launched for the
model replica, the first cut-out answered (``tests/slow/test_cluster.py`` and
``python -m deployments.bench cold``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml
from ray import serve

from deployments.bench.harness import Json, free_port
from deployments.serve_app import build_app

IDLE_TIMEOUT_S = 6
GPU_WORKER = ("gpu", {"CPU": 2, "GPU": 1})
CPU_WORKER = ("cpu", {"CPU": 2})


def autoscaling_config(
    gcs_address: str, head_cpus: int = 1, worker: tuple[str, dict[str, int]] = GPU_WORKER
) -> dict[str, Any]:
    """The fake provider's cluster config: a head and ``worker`` nodes from zero.

    Ray's wheel lacks the example YAML that ``ray.cluster_utils.AutoscalingCluster``
    reads, so the whole config is written here.
    """
    return {
        "cluster_name": "rembg-fake",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            # Its nodes join this head, not the default port 6379.
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {
                "resources": {"CPU": head_cpus},
                "node_config": {},
                "max_workers": 0,
            },
            worker[0]: {
                "resources": worker[1],
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "upscaling_speed": 1.0,
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@dataclass
class FakeCluster:
    address: str
    temp_dir: Path
    head: subprocess.Popen[bytes]


def pids_under(temp_dir: Path) -> list[int]:
    """Processes whose command line names our temp dir (a node that left our group)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(temp_dir).encode() in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def stop(cluster: FakeCluster) -> None:
    """Stop our head and the nodes its autoscaler started, and nothing else."""
    group = cluster.head.pid
    try:
        os.killpg(group, signal.SIGTERM)  # `ray start --block` stops its node on TERM
        cluster.head.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    for pid in pids_under(cluster.temp_dir):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.head.wait(timeout=10)


@contextmanager
def fake_cluster(
    log: Path, head_cpus: int = 1, worker: tuple[str, dict[str, int]] = GPU_WORKER
) -> Iterator[FakeCluster]:
    from ray.util import get_node_ip_address

    # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    port = free_port()
    address = f"{get_node_ip_address()}:{port}"
    config = temp_dir / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(address, head_cpus, worker)))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # Ray reads the driver's auth mode once per process, before this test
        # runs; a head that asked for a token would turn this driver away.
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray_cli = Path(sys.executable).parent / "ray"
    command = [
        str(ray_cli), "start", "--head", "--block",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        f"--autoscaling-config={config}",
        f"--num-cpus={head_cpus}",
        "--num-gpus=0",
        "--include-dashboard=false",
        # Every fixed default port taken elsewhere on a shared machine.
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]  # fmt: skip
    with log.open("wb") as out:  # the head keeps its own copy of the descriptor
        head = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    cluster = FakeCluster(address, temp_dir, head)
    try:
        yield cluster
    finally:
        try:
            if ray.is_initialized():
                with suppress(Exception):  # Serve may never have started
                    serve.shutdown()
                ray.shutdown()
        finally:
            stop(cluster)
            shutil.rmtree(temp_dir, ignore_errors=True)


def nodes_with(resource: str) -> list[str]:
    """The IDs of the live nodes that offer ``resource`` (GPU, CPU)."""
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource, 0) > 0]


def gpu_nodes() -> list[str]:
    return nodes_with("GPU")


def connect(cluster: FakeCluster, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if cluster.head.poll() is not None:
            raise RuntimeError(f"the head exited:\n{log.read_text()[-3000:]}")
        try:
            ray.init(address=cluster.address)
            return
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def new_node(image: bytes, log: Path) -> Json:
    """Deploy the real app on a head with no CPUs: the model replica (one CPU)
    needs a node, which the autoscaler launches. Seconds from the deployment
    until the app runs and until the first cut-out is answered."""
    with fake_cluster(log, head_cpus=0, worker=CPU_WORKER) as cluster:
        connect(cluster, log)
        before = len(nodes_with("CPU"))
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        started = time.monotonic()
        # One CPU per model replica: it cannot run on the head, so the autoscaler
        # must launch a node for it; the ingress takes no CPU.
        serve.run(build_app({"device": "cpu", "num_cpus": 1}), name="rembg", route_prefix="/")
        up_s = time.monotonic() - started
        response = httpx.post(f"http://127.0.0.1:{port}/remove", content=image, timeout=120)
        first_s = time.monotonic() - started
        return {
            "workers_before": before,
            "workers_after": len(nodes_with("CPU")),
            "status": response.status_code,
            "app_running_s": round(up_s, 2),
            "first_cutout_s": round(first_s, 2),
        }
