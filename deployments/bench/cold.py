"""Cold starts: the time from a start to the first successful cut-out, per path.

Measured on this machine, each path the way an operator meets it:

1. ``second_start``: `serve run serve_config.yaml` where it has run before (the
   Python, numba and OS caches warm), until ``/healthz`` answers 200 and until the
   first cut-out comes back, with the steps between taken from the log's own
   timestamps (Ray's start, Serve's, the app's import, the model's load and
   warm-up, the ingress's warm-up);
2. ``refine``: the first alpha-matting request once ``/models`` says the refiners
   are warm, against the steady one;
3. ``new_replica``: a second model replica added with `serve deploy` to a running
   service under load: from the controller's "Adding 1 replica" to the replica's
   session loaded and warm, and to the first request it answers;
4. ``fresh_install``: this checkout installed as its wheel (`pip install .`, as
   the Docker image installs it) into a new virtualenv, then `serve run` from an
   empty directory: the start a new machine, container or node pays (nothing of
   the checkout's virtualenv; pip compiles the bytecode at install, as the
   image's build does). It stands in for the image's start where no container
   engine runs;
5. ``new_node``: a cluster that scales from no workers (Ray's fake multi-node
   provider, ``deployments.bench.cluster``): the app deployed on a CPU-less head,
   a node launched for the model replica, until the first cut-out.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from deployments.bench.harness import (
    ROOT,
    Json,
    Load,
    Running,
    free_port,
    serve_config,
    start_service,
    stop_process,
    write_config,
)
from deployments.settings import deployment_name

MODEL = "u2netp"
MODEL_DEPLOYMENT = deployment_name(MODEL)
# The log's timestamps: `2026-11-23 18:29:06,381`.
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
# Steps of a start, each the first log line that says it is done.
STEPS = (
    ("ray_started", "Started a local Ray instance"),
    ("serve_started", "Started Serve in namespace"),
    ("app_built", "Imported and built app"),
    ("model_loaded", f"model {MODEL}: loaded"),
    ("ingress_warm", f"warm through {MODEL}"),
)


def stamp(line: str) -> float | None:
    found = STAMP.search(line)
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def breakdown(log: Path, started: float) -> Json:
    """Seconds from ``started`` (epoch) to each step of the start, from ``log``."""
    steps: Json = {}
    lines = log.read_text(errors="replace").splitlines()
    for name, marker in STEPS:
        at = next((stamp(line) for line in lines if marker in line), None)
        steps[name] = None if at is None else round(at - started, 2)
    loaded = next((line for line in lines if f"model {MODEL}: loaded" in line), "")
    found = re.search(r"in ([\d.]+)s \(load ([\d.]+)s, warm-up ([\d.]+)s", loaded)
    if found:
        steps["model_load_and_warm_s"] = float(found.group(1))
        steps["model_session_s"] = float(found.group(2))
        steps["model_warmup_s"] = float(found.group(3))
    return steps


def timed_post(client: httpx.Client, data: bytes, params: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    response = client.post("/remove", content=data, params=params or {})
    response.raise_for_status()
    return time.perf_counter() - started


def wait_refine_warm(client: httpx.Client, timeout_s: float = 600) -> Json:
    """``/models``'s ``refine`` once it says warm (or failed), with the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        refine: Json = client.get("/models").json().get("refine", {})
        if refine.get("warm") or refine.get("error"):
            return {**refine, "waited_s": round(time.perf_counter() - started, 2)}
        time.sleep(0.5)
    return {"warm": False, "waited_s": timeout_s}


def second_start(tmp: Path, image: bytes) -> Json:
    """`serve run` of the repository's config: ready, first cut-out, first matting."""
    port = free_port()
    path = write_config(tmp, serve_config(port), "cold-serve_config.yaml")
    log = tmp / "cold-serve.log"
    started_epoch = time.time()
    started = time.perf_counter()
    service = start_service(path, log)
    try:
        with service.client(timeout=300) as client:
            first = timed_post(client, image)
            first_cutout_s = time.perf_counter() - started
            steady = statistics.median(timed_post(client, image) for _ in range(3))
            refine = wait_refine_warm(client)
            matting = {"alpha_matting": "true"}
            first_matting = timed_post(client, image, matting)
            steady_matting = statistics.median(timed_post(client, image, matting) for _ in range(3))
    finally:
        stop_process(service.process)
    return {
        "ready_s": round(service.ready_s, 2),
        "first_cutout_s": round(first_cutout_s, 2),
        "first_request_ms": round(first * 1000, 1),
        "steady_request_ms": round(steady * 1000, 1),
        "steps_s": breakdown(log, started_epoch),
        "refine": refine,
        "first_matting_ms": round(first_matting * 1000, 1),
        "steady_matting_ms": round(steady_matting * 1000, 1),
        "first_matting_over_steady": round(first_matting / steady_matting, 3),
    }


def fresh_install(tmp: Path, image: bytes) -> Json:
    """`pip install .` into a new virtualenv, then `serve run` from it: ready, first cut-out."""
    venv = tmp / "fresh-venv"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(ROOT)]
    subprocess.run(pip, check=True, cwd=tmp)
    install_s = time.perf_counter() - started
    here = tmp / "fresh-run"
    here.mkdir()
    path = write_config(here, serve_config(free_port()), "serve_config.yaml")
    # Nothing of the checkout on the path: the installed package serves.
    env = {"PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(here)}
    started = time.perf_counter()
    service = start_service(path, here / "serve.log", env=env, bin_dir=venv / "bin", cwd=here)
    try:
        with service.client(timeout=300) as client:
            timed_post(client, image)
            first_cutout_s = time.perf_counter() - started
            steady = statistics.median(timed_post(client, image) for _ in range(3))
    finally:
        stop_process(service.process)
    return {
        "install_s": round(install_s, 1),
        "ready_s": round(service.ready_s, 2),
        "first_cutout_s": round(first_cutout_s, 2),
        "steady_request_ms": round(steady * 1000, 1),
    }


def dashboard_address(log: Path) -> str:
    found = re.search(
        r"View the dashboard at \S*?(http://[\w.:]+)", log.read_text(errors="replace")
    )
    return found.group(1) if found else "http://127.0.0.1:8265"


def replica_events(log: Path) -> tuple[list[float], dict[str, float], dict[str, float]]:
    """The model deployment's "Adding 1 replica" times, each replica's warm session
    and first answered request (by replica id), from `serve run`'s log."""
    adds: list[float] = []
    started: dict[str, float] = {}
    first_call: dict[str, float] = {}
    # The replica's own "loaded" line: its session is warm and it is about to
    # report ready (`serve run` prints it; the controller's lines go to its file).
    start_line = re.compile(rf"rembg_{MODEL_DEPLOYMENT} (\w+) -- model {MODEL}: loaded")
    call_line = re.compile(rf"rembg_{MODEL_DEPLOYMENT} (\w+) \S+ -- CALL predict(?:_packed)? OK")
    for line in log.read_text(errors="replace").splitlines():
        at = stamp(line)
        if at is None:
            continue
        if f"Adding 1 replica to Deployment(name='{MODEL_DEPLOYMENT}'" in line:
            adds.append(at)
        elif found := start_line.search(line):
            started.setdefault(found.group(1), at)
        elif found := call_line.search(line):
            first_call.setdefault(found.group(1), at)
    return adds, started, first_call


def serve_deploy(config: Json, tmp: Path, address: str) -> None:
    path = write_config(tmp, config, "cold-deploy.yaml")
    serve = Path(sys.executable).parent / "serve"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run(
        [str(serve), "deploy", str(path), "--address", address],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )


def new_replica(tmp: Path, images: dict[str, bytes], timeout_s: float = 300) -> Json:
    """A second model replica added under load by `serve deploy` (min_replicas 2).

    The model replicas take one CPU each here, so that two fit on a 2-core node.
    """
    port = free_port()
    edits: dict[str, Any] = {"args": {"num_cpus": 1}}
    # A first answer is found by Serve's access line on the console, which
    # serve_config.yaml turns off for the model deployment: on again here.
    access = {"logging_config": {"enable_access_log": True}}
    config = serve_config(port, **edits, deployments={MODEL_DEPLOYMENT: access})
    log = tmp / "cold-replica.log"
    # Ray folds repeated log lines into one "[repeated Nx]" line printed seconds
    # later: the new replica's first "CALL predict" must be printed when it happens.
    service: Running = start_service(
        write_config(tmp, config, "cold-replica.yaml"), log, env={"RAY_DEDUP_LOGS": "0"}
    )
    try:
        with Load(service.url, images, clients=2) as load:
            time.sleep(3)
            more = serve_config(
                port,
                **edits,
                deployments={
                    MODEL_DEPLOYMENT: {**access, "autoscaling_config": {"min_replicas": 2}}
                },
            )
            serve_deploy(more, tmp, dashboard_address(log))
            started = time.perf_counter()
            while time.perf_counter() - started < timeout_s:
                adds, up, served = replica_events(log)
                if len(adds) >= 2 and any(r in served and up[r] > adds[-1] for r in up):
                    break
                time.sleep(1)
            time.sleep(2)
        statuses = {str(k): v for k, v in sorted(load.statuses().items())}
    finally:
        stop_process(service.process)
    adds, up, served = replica_events(log)
    if len(adds) < 2:
        return {"error": "no second replica was added", "statuses": statuses}
    scheduled = adds[-1]
    new = [r for r in up if up[r] >= scheduled]
    replica = new[0] if new else ""
    if replica not in served:
        return {"error": "the new replica did not serve in time", "statuses": statuses}
    return {
        "scheduled_to_warm_s": round(up[replica] - scheduled, 2),
        "scheduled_to_first_answer_s": round(served[replica] - scheduled, 2),
        "statuses_during": statuses,
    }


def run(tmp: Path, images: dict[str, bytes]) -> Json:
    image = images.get("car-1.jpg") or next(iter(images.values()))
    print("cold: a second start of serve_config.yaml ...", flush=True)
    results: Json = {"second_start": second_start(tmp, image)}
    print("cold: a new model replica under load ...", flush=True)
    results["new_replica"] = new_replica(tmp, images)
    print("cold: a fresh virtualenv from this checkout's wheel ...", flush=True)
    results["fresh_install"] = fresh_install(tmp, image)
    print("cold: a new node from the cluster autoscaler ...", flush=True)
    from deployments.bench.cluster import new_node  # Ray in this process: only here

    results["new_node"] = new_node(image, tmp / "cluster-head.log")
    return results


def targets(results: Json) -> list[tuple[str, float | bool | None, str, float | None]]:
    """Each cold path to its first cut-out, side by side, with the goals it has."""
    start = results["second_start"]
    replica = results["new_replica"]
    fresh = results["fresh_install"]
    node = results["new_node"]
    return [
        ("fresh install (the image's start): ready (s)", fresh["ready_s"], "<=", 45.0),
        ("fresh install: first cut-out (s)", fresh["first_cutout_s"], "", None),
        ("fresh install / second start (ready)", fresh["ready_s"] / start["ready_s"], "<=", 1.3),
        ("second start: first cut-out (s)", start["first_cutout_s"], "", None),
        (
            "new replica: scheduled -> serving (s)",
            replica.get("scheduled_to_first_answer_s"),
            "<=",
            8.0,
        ),
        (
            "new replica: only 200 during",
            set(replica.get("statuses_during", {})) == {"200"},
            "",
            None,
        ),
        ("new node: deployed -> first cut-out (s)", node["first_cutout_s"], "", None),
        ("new node: first cut-out answered 200", node["status"] == 200, "", None),
        ("first matting / steady matting", start["first_matting_over_steady"], "<=", 2.0),
    ]


def table(results: Json) -> list[str]:
    start, replica = results["second_start"], results["new_replica"]
    fresh = results["fresh_install"]
    lines = [
        "",
        "cold starts, each to its first cut-out (second start of serve_config.yaml first)",
        f"  ready {start['ready_s']} s, first cut-out {start['first_cutout_s']} s "
        f"(first request {start['first_request_ms']} ms, steady {start['steady_request_ms']} ms)",
        "  steps (s from `serve run`): "
        + ", ".join(f"{k} {v}" for k, v in start["steps_s"].items()),
        f"  refiners warm: {start['refine']}; first matting {start['first_matting_ms']} ms, "
        f"steady {start['steady_matting_ms']} ms",
        f"  new model replica under load: {replica}",
        f"  fresh virtualenv (`pip install .`, {fresh['install_s']} s; stands in for the "
        f"Docker image's start): ready {fresh['ready_s']} s, first cut-out "
        f"{fresh['first_cutout_s']} s",
        f"  new node from the cluster autoscaler: {results['new_node']}",
    ]
    return lines
