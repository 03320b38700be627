"""Throughput and latency: the model alone, the same stages in process, the service, the peer.

Measured in one run, on this machine:

1. the model limit: the ONNX session alone at its best batch size, with the
   replica's thread count;
2. the in-process pipeline: the service's own ``Remover`` (the same stages in a
   pool of the same size) around the service's own ``ModelServer`` class (the same
   ``@serve.batch`` policy), with no Serve, no HTTP;
3. the service from serve_config.yaml (`serve run` on a free port) over HTTP:
   closed loops at concurrency 1/16/64, the first request after ready, 12 and 24
   megapixel uploads with the replicas' peak RSS, batch sizes formed, parity;
4. the peer, ``rembg s``, in its own venv (rembg[cli] pins conflict with Ray's),
   driven the same way, its first request included.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from ray.serve.batching import _BatchQueue

from deployments.bench.harness import (
    ROOT,
    Json,
    Running,
    compare,
    deployment_options,
    free_port,
    post_rembg,
    rembg_reference,
    rss_peaks,
    run_load,
    serve_config,
    serve_replicas,
    start_process,
    start_service,
    stop_process,
    write_config,
)
from deployments.infer import OnnxModel
from deployments.model_server import ModelServer, Resources
from deployments.models import resolve_model_file, spec_for
from deployments.options import CutoutOptions
from deployments.pipeline import prepare
from deployments.preprocess import normalize_batch
from deployments.runtime import RuntimeConfig
from deployments.service import Job, Remover, RemoverConfig
from deployments.settings import AppSettings, LiveModelConfig, deployment_name

MODEL = "u2netp"
CONCURRENCY = (1, 16, 64)
PEER_VENV = ROOT / ".venv-peer"
PEER_REQUIREMENTS = ("rembg[cli]==2.0.86", "onnxruntime")
# The large uploads: about 12 and 24 megapixels, 4:3 like the shared photos.
LARGE = {"12mp": (4000, 3000), "24mp": (5664, 4248)}


def served_settings(config: Json) -> tuple[AppSettings, LiveModelConfig]:
    """The app args and the model's user_config a serve config runs with."""
    app = config["applications"][0]
    settings = AppSettings.model_validate(app["args"])
    user_config = deployment_options(config, deployment_name(MODEL)).get("user_config", {})
    return settings, LiveModelConfig.model_validate(user_config)


def large_images(directory: Path, source: bytes) -> dict[str, Path]:
    """Upscaled JPEG photos (the content is a real photo, only bigger)."""
    paths = {}
    with Image.open(io.BytesIO(source)) as img:
        rgb = img.convert("RGB")
        for name, size in LARGE.items():
            path = directory / f"{name}.jpg"
            rgb.resize(size, Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
            paths[name] = path
    return paths


# --- 1. model limit -------------------------------------------------------------------------


def model_limit(settings: AppSettings, images: Mapping[str, bytes], seconds: float) -> Json:
    """The session alone (no pre/post), images/s at batch 1, 2, 4 and 8."""
    threads = max(1, round(settings.num_cpus))
    runtime = RuntimeConfig(intra_op_threads=threads)
    model = OnnxModel(resolve_model_file(MODEL), spec_for(MODEL), runtime, 8)
    inputs = [prepare(data, model.spec, settings.limits).model_input for data in images.values()]
    by_batch: dict[str, float] = {}
    for n in (1, 2, 4, 8):
        batch = normalize_batch([inputs[i % len(inputs)] for i in range(n)], model.spec)
        feed = {model.input_name: batch}
        model.session.run(None, feed)  # this shape's first run allocates
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or runs < 1:
            model.session.run(None, feed)
            runs += 1
        by_batch[str(n)] = round(runs * n / elapsed, 2)
    best = max(by_batch, key=lambda k: by_batch[k])
    return {
        "intra_op_threads": threads,
        "images_per_s_by_batch": by_batch,
        "best_batch": int(best),
        "images_per_s": by_batch[best],
    }


# --- 2. in-process pipeline -----------------------------------------------------------------


def _no_warning(self: object) -> None:
    return None


@contextmanager
def batching_outside_a_replica() -> Iterator[None]:
    """Lets ``@serve.batch`` run in this process, with no Serve replica around it.

    Serve's batch queue reads the replica's config only to log a warning
    (max_batch_size against max_ongoing_requests), through a private field of the
    replica context; outside a replica there is none and that read raises. Ray
    offers no public switch, so that one check is skipped while this is open, and
    put back when it closes: the batching itself is Serve's own.
    """
    check = _BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests
    _BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = _no_warning
    try:
        yield
    finally:
        _BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = check


async def drop_batch_queues(*classes: type) -> None:
    """Stop and drop the batch queues ``classes``' ``@serve.batch`` methods built here.

    Serve builds a method's queue lazily, in the replica; a class holding a built
    one cannot be pickled, so a later deployment of the class from this process
    (the benchmark's cluster part) would fail to serialize it. Each queue's batching
    task is cancelled and awaited and the queue collected here, on the running
    loop: collected later with no loop running, Serve's queue makes an event loop
    of its own and leaves it open.
    """
    for cls in classes:
        for member in vars(cls).values():
            # @serve.batch exposes its lazy queue holder through these bound setters.
            holder: Any = getattr(getattr(member, "set_max_batch_size", None), "__self__", None)
            queue = getattr(holder, "_queue", None)
            if queue is None:
                continue
            task = queue._handle_batch_task
            holder._queue = None
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    queue = task = None
    gc.collect()


class InProcess:
    """The service's ingress work and model replica, in this process, without Serve."""

    def __init__(self, settings: AppSettings, live: LiveModelConfig) -> None:
        self.settings, self.live = settings, live
        self.stack = ExitStack()

    async def __aenter__(self) -> InProcess:
        # Ray is not running here: the CPUs the replica would be given are passed
        # in, and the batch queue runs without a replica (batching_outside_a_replica).
        # The session, the @serve.batch policy and the stages are the service's own.
        self.stack.enter_context(batching_outside_a_replica())
        try:
            await self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    async def _start(self) -> None:
        server_class: Any = ModelServer.func_or_class  # type: ignore[attr-defined]
        self.server = server_class(
            {"name": MODEL}, 0.0, resources=Resources(self.settings.num_cpus)
        )
        await self.server.reconfigure(self.live.model_dump(mode="json"))
        threads = self.settings.ingress_threads or os.cpu_count() or 2
        self.remover = Remover(
            RemoverConfig.of(self.settings), {MODEL: self.server.predict}, threads
        )
        await self.remover.warm_up()

    async def __aexit__(self, *exc: object) -> None:
        try:
            self.remover.close()
            await drop_batch_queues(ModelServer.func_or_class)  # type: ignore[attr-defined]
        finally:
            self.stack.close()

    async def one(self, data: bytes) -> float:
        started = time.perf_counter()
        await self.remover.remove(Job(data, None, CutoutOptions()))
        return time.perf_counter() - started

    async def closed_loop(self, images: Mapping[str, bytes], total: int, clients: int) -> float:
        """Images/s of ``clients`` coroutines sending ``total`` images in all."""
        bodies = list(images.values())
        counter = iter(range(total))

        async def client() -> None:
            for i in counter:
                await self.remover.remove(Job(bodies[i % len(bodies)], None, CutoutOptions()))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return total / (time.perf_counter() - started)


def in_process(
    settings: AppSettings,
    live: LiveModelConfig,
    images: Mapping[str, bytes],
    requests: int,
    repeats: int,
) -> Json:
    """Per-image sequential latency (median of ``repeats``), then throughput at c16."""

    async def measure() -> Json:
        async with InProcess(settings, live) as local:
            latency = {}
            for name, data in images.items():
                times = [await local.one(data) for _ in range(repeats)]
                latency[name] = round(statistics.median(times) * 1000, 1)
            before = Counter(local.server.batch_sizes)
            rate = await local.closed_loop(images, requests, 16)
            formed = Counter(local.server.batch_sizes) - before
        return {
            "latency_ms_by_image": latency,
            "latency_ms_mean": round(statistics.fmean(latency.values()), 1),
            "concurrency": 16,
            "stage_threads": local.remover.pool._max_workers,
            "images_per_s": round(rate, 2),
            "batch_sizes_formed": {str(k): v for k, v in sorted(formed.items())},
        }

    return asyncio.run(measure())


# --- 3. and 4. over HTTP ------------------------------------------------------------------------


def batch_counts(url: str) -> Counter[str]:
    models = httpx.get(url + "/models", timeout=30).json()["models"]
    counts: Counter[str] = Counter()
    for info in models:
        counts.update({k: int(v) for k, v in info.get("batch_sizes_formed", {}).items()})
    return counts


def load_phase(
    url: str, images: Mapping[str, bytes], total: int, clients: int, served: bool
) -> Json:
    """A closed loop of ``total`` requests; for the service, the batch sizes formed."""
    before = batch_counts(url) if served else None
    summary = run_load(url, images, clients, total=total, send=post_rembg, timeout_s=300).summary()
    if before is not None:
        summary["batch_sizes_formed"] = dict(batch_counts(url) - before)
    return summary


def first_request(url: str, images: Mapping[str, bytes]) -> tuple[Json, dict[str, bytes]]:
    """The first request after ready, then one output per image (for parity)."""
    outputs: dict[str, bytes] = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        name, data = next(iter(images.items()))
        started = time.perf_counter()
        first = post_rembg(client, name, data)
        elapsed = time.perf_counter() - started
        for each, body in images.items():
            response = post_rembg(client, each, body)
            outputs[each] = response.content if response.status_code == 200 else b""
    summary = {"image": name, "status": first.status_code, "latency_ms": round(elapsed * 1000, 1)}
    return summary, outputs


def large_uploads(url: str, paths: Mapping[str, Path], watch: list[int]) -> dict[str, Json]:
    """One request per large photo, with the peak RSS of ``watch`` during each."""
    results: dict[str, Json] = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for name, path in paths.items():
            data = path.read_bytes()
            with Image.open(path) as img:
                width, height = img.size
            with rss_peaks(watch) as peaks:
                baseline = dict(peaks)
                started = time.perf_counter()
                response = post_rembg(client, path.name, data)
                elapsed = time.perf_counter() - started
            rgba = width * height * 4
            growth = {pid: peaks[pid] - baseline[pid] for pid in watch}
            results[name] = {
                "size": [width, height],
                "upload_bytes": len(data),
                "status": response.status_code,
                "latency_ms": round(elapsed * 1000, 1),
                "response_bytes": len(response.content),
                "decoded_rgba_bytes": rgba,
                "memory": {
                    "peak_rss_bytes_total": sum(peaks.values()),
                    "baseline_rss_bytes_total": sum(baseline.values()),
                    "peak_growth_bytes_by_pid": {str(k): v for k, v in growth.items()},
                    # The request's cost: the largest growth of any one process
                    # (the ingress holds the full-size image; the model sees 320px).
                    "peak_growth_bytes": max(growth.values()),
                    "peak_growth_x_rgba": round(max(growth.values()) / rgba, 2),
                },
            }
    return results


def setup_peer(venv: Path = PEER_VENV) -> Path:
    """A venv of its own for `rembg s`: rembg[cli]'s pins conflict with Ray's."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True)
    # rembg's import JIT-compiles pymatting with numba (minutes on 2 busy cores)
    # and caches it: pay that here, not in the peer's start-up.
    subprocess.run([str(python), "-c", "import rembg.bg"], check=True)
    return python


def start_peer(python: Path, home: Path, tmp: Path) -> Running:
    port = free_port()
    # rembg.cli has no __main__ guard; BROWSER=true stops its startup hook from
    # opening anything.
    argv = [
        str(python),
        "-c",
        "import sys; from rembg.cli import main; sys.exit(main())",
        *("s", "--no-ui", "-h", "127.0.0.1", "-p", str(port), "-l", "warning"),
    ]
    # U2NET_HOME, when set, would win over REMBG_HOME and send rembg downloading.
    env = {k: v for k, v in os.environ.items() if k != "U2NET_HOME"}
    env.update(REMBG_HOME=str(home), BROWSER="true")
    return start_process(argv, env, tmp / "peer.log", f"http://127.0.0.1:{port}", "/api", 900)


def drive(
    servers: Mapping[str, Running],
    images: Mapping[str, bytes],
    large: Mapping[str, Path],
    requests: int,
    waves: int,
    local: Callable[[], None],
) -> dict[str, Json]:
    """Both servers up at once, driven in turn: service c1, peer c1, service c16...

    The machine's load drifts (other work shares it); alternating the phases
    keeps each pair of figures minutes apart at most. ``local`` (the in-process
    figures) runs while both idle, right after the first requests.
    """
    results: dict[str, Json] = {}
    outputs: dict[str, bytes] = {}
    for who, running in servers.items():
        # rembg builds its session on its first request; the service is warm
        # before ready: that first request is one of the targets.
        first, got = first_request(running.url, images)
        results[who] = {"ready_s": round(running.ready_s, 1), "first_request": first, "phases": {}}
        if who == "service":
            outputs = got
    local()
    for c in CONCURRENCY:
        for who, running in servers.items():
            print(f"driving {who} at concurrency {c} ...", flush=True)
            results[who]["phases"][f"c{c}"] = load_phase(
                running.url, images, max(requests, waves * c), c, who == "service"
            )
    for who, running in servers.items():
        if who == "service":
            pids = serve_replicas(running.process.pid)
        else:
            pids = {running.process.pid: "rembg s"}
        results[who]["processes"] = {str(pid): title for pid, title in pids.items()}
        results[who]["large"] = large_uploads(running.url, large, list(pids))
    if "service" in results:
        results["service"]["outputs"] = outputs
    return results


def parity(outputs: Mapping[str, bytes], images: Mapping[str, bytes], home: Path) -> Json:
    """Served outputs against rembg.remove in this process, pixel for pixel."""
    reference = rembg_reference(images, home)
    checks = {
        name: compare(outputs[name], reference[name]).as_json()
        if outputs.get(name)
        else {"identical": False, "reason": "no served output"}
        for name in images
    }
    return {"identical": all(c["identical"] for c in checks.values()), "images": checks}


def run(
    tmp: Path,
    images: Mapping[str, bytes],
    home: Path,
    *,
    requests: int,
    quick: bool,
    peer_python: Path | None,
) -> Json:
    """Every throughput figure of one run; ``peer_python`` None leaves the peer out."""
    waves = 1 if quick else 2
    seconds = 0.0 if quick else 3.0
    config = serve_config(free_port())
    settings, live = served_settings(config)
    results: Json = {
        "config": {
            "args": config["applications"][0]["args"],
            "user_config": live.model_dump(mode="json"),
        }
    }

    def measure_local() -> None:
        print("measuring the model limit ...", flush=True)
        results["model_limit"] = model_limit(settings, images, seconds)
        print("measuring the in-process pipeline ...", flush=True)
        results["pipeline"] = in_process(
            settings, live, images, requests if quick else max(requests, 32), 1 if quick else 3
        )

    source = images.get("car-1.jpg") or next(iter(images.values()))
    large = large_images(tmp, source)
    servers: dict[str, Running] = {}
    with ExitStack() as stack:
        # The peer first: the service's first request must follow its ready.
        if peer_python is not None:
            print("starting the peer (rembg s) ...", flush=True)
            servers["peer"] = start_peer(peer_python, home, tmp)
            stack.callback(stop_process, servers["peer"].process)
        print("starting the service ...", flush=True)
        path = write_config(tmp, config)
        servers = {"service": start_service(path, tmp / "serve.log"), **servers}
        stack.callback(stop_process, servers["service"].process)
        results.update(drive(servers, images, large, requests, waves, measure_local))
    outputs = results["service"].pop("outputs")
    results["service"]["parity"] = parity(outputs, images, home)
    return results


def targets(results: Json) -> list[tuple[str, float | bool | None, str, float | None]]:
    """(name, value, op, goal) for each target, from figures of this one run."""
    service, peer = results["service"], results.get("peer")
    limit = results["model_limit"]["images_per_s"]
    pipe = results["pipeline"]
    c16, c1 = service["phases"]["c16"], service["phases"]["c1"]
    by_image = c1["latency_ms_p50_by_image"]
    served = [by_image[n] for n in pipe["latency_ms_by_image"] if n in by_image]
    local = [pipe["latency_ms_by_image"][n] for n in by_image]
    steady = by_image.get(service["first_request"]["image"])
    big = service["large"].get("24mp")
    peer16 = peer["phases"]["c16"]["images_per_s"] if peer else None
    return [
        ("served c16 / model limit", c16["images_per_s"] / limit, ">=", 0.85),
        ("served c16 / in-process c16", c16["images_per_s"] / pipe["images_per_s"], ">=", 0.9),
        (
            "c1 latency / in-process latency",
            statistics.fmean(served) / statistics.fmean(local) if served else None,
            "<=",
            1.1,
        ),
        ("c16 p99 / p50", c16["latency_ms"]["p99"] / c16["latency_ms"]["p50"], "<=", 2.0),
        (
            "first request / steady c1",
            service["first_request"]["latency_ms"] / steady if steady else None,
            "<=",
            1.2,
        ),
        (
            "24 MP peak growth / RGBA size",
            big["memory"]["peak_growth_x_rgba"] if big and big["status"] == 200 else None,
            "<=",
            5.0,
        ),
        ("served c16 / peer c16", c16["images_per_s"] / peer16 if peer16 else None, ">=", 1.3),
        ("parity with rembg (pixel-identical)", service["parity"]["identical"], "==", None),
    ]


def table(results: Json) -> list[str]:
    lines = []
    limit = results["model_limit"]
    lines.append(
        f"model limit: {limit['images_per_s']} img/s at batch "
        f"{limit['best_batch']} ({limit['images_per_s_by_batch']})"
    )
    pipe = results["pipeline"]
    lines.append(
        f"in-process pipeline: {pipe['images_per_s']} img/s at c16 "
        f"{pipe['batch_sizes_formed']}, {pipe['latency_ms_mean']} ms per image sequential"
    )
    header = f"{'':8}{'phase':6}{'img/s':>8}{'p50':>9}{'p95':>9}{'p99':>9}  statuses / batches"
    lines += ["", header]
    for who in ("service", "peer"):
        part = results.get(who)
        if not part:
            continue
        for key, phase in part["phases"].items():
            lat = phase["latency_ms"]
            lines.append(
                f"{who:8}{key:6}{phase['images_per_s']:>8}{lat.get('p50', 0):>9}"
                f"{lat.get('p95', 0):>9}{lat.get('p99', 0):>9}  {phase['statuses']}"
                f" {phase.get('batch_sizes_formed', '')}"
            )
        for key, big in part["large"].items():
            mem = big.get("memory", {})
            lines.append(
                f"{who:8}{key:6}{'':>8}{big['latency_ms']:>9}{'':>18}  "
                f"status {big['status']}, peak growth {mem.get('peak_growth_x_rgba', '-')}x RGBA"
            )
        first = part["first_request"]
        lines.append(
            f"{who:8}first {first['latency_ms']} ms (status {first['status']}), "
            f"ready in {part['ready_s']} s"
        )
    return lines
