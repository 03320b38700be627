"""Throughput and latency benchmark: model limit, in-process pipeline, service, peer.

``python -m deployments.bench`` measures in one run, on this machine:

1. the model limit: the ONNX session alone at its best batch size;
2. the in-process pipeline (prepare -> predict -> finish) run as the service runs
   it (a thread pool for the stages around one batching model loop);
3. the service from serve_config.yaml (``serve run`` on a free port) over HTTP,
   closed loops at concurrency 1/16/64, the first request after ready, 12 and 24
   megapixel uploads with the replicas' peak RSS, batch sizes formed, parity;
4. the peer, ``rembg s``, in its own venv (rembg[cli] pins conflict with Ray's),
   driven the same way;

then prints a table and writes JSON with the target ratios marked PASS/FAIL.
Ratios are what count: every figure comes from the same run on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import yaml
from PIL import Image

from deployments.compose import RemoveOptions
from deployments.infer import OnnxModel, RuntimeConfig
from deployments.models import EMBEDDED, resolve_model_file, spec_for
from deployments.pipeline import finish, prepare
from deployments.preprocess import normalize_batch
from deployments.settings import Limits

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = "u2netp"
CONCURRENCY = (1, 16, 64)
PEER_VENV = ROOT / ".venv-peer"
PEER_REQUIREMENTS = ("rembg[cli]==2.0.86", "onnxruntime")
# The large uploads: about 12 and 24 megapixels, 4:3 like the shared photos.
LARGE = {"12mp": (4000, 3000), "24mp": (5664, 4248)}

Json = dict[str, Any]


# --- measurement helpers ------------------------------------------------------


def percentiles(values_s: Sequence[float]) -> Json:
    """Latency summary in milliseconds (nearest-rank percentiles)."""
    ordered = sorted(values_s)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    return {
        "p50": round(rank(50) * 1000, 1),
        "p95": round(rank(95) * 1000, 1),
        "p99": round(rank(99) * 1000, 1),
        "mean": round(statistics.fmean(ordered) * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shared_images() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*-1.jpg"))}


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


def load_model(max_batch_size: int) -> OnnxModel:
    threads = os.cpu_count() or 1
    runtime = RuntimeConfig(intra_op_threads=threads)
    return OnnxModel(resolve_model_file(MODEL), spec_for(MODEL), runtime, max_batch_size)


# --- 1. model limit -------------------------------------------------------------


def model_limit(model: OnnxModel, images: Sequence[bytes], seconds: float) -> Json:
    """The session alone (no pre/post), images/s at batch 1, 2, 4 and 8."""
    inputs = [prepare(data, model.spec, Limits()).model_input for data in images]
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
        "intra_op_threads": model.runtime.intra_op_threads,
        "images_per_s_by_batch": by_batch,
        "best_batch": int(best),
        "images_per_s": by_batch[best],
    }


# --- 2. in-process pipeline -----------------------------------------------------


async def _pipeline_loop(
    model: OnnxModel,
    images: Sequence[bytes],
    total: int,
    concurrency: int,
    threads: int,
    max_batch_size: int,
    batch_wait_s: float,
    png_level: int,
) -> tuple[float, Counter[int]]:
    """The service without HTTP: stages in a pool, one batching model loop."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="stages")
    queue: asyncio.Queue[tuple[npt.NDArray[np.uint8], asyncio.Future[Any]]] = asyncio.Queue()
    sizes: Counter[int] = Counter()
    options, limits = RemoveOptions(), Limits()

    async def batcher() -> None:
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + batch_wait_s
            while len(batch) < max_batch_size:
                try:
                    wait = max(0.0, deadline - loop.time())
                    batch.append(await asyncio.wait_for(queue.get(), wait))
                except TimeoutError:
                    break
            sizes[len(batch)] += 1
            masks = await asyncio.to_thread(model.predict, [x for x, _ in batch])
            for (_, future), mask in zip(batch, masks, strict=True):
                future.set_result(mask)

    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            data = images[i % len(images)]
            prepared = await loop.run_in_executor(pool, prepare, data, model.spec, limits)
            future: asyncio.Future[Any] = loop.create_future()
            await queue.put((prepared.model_input, future))
            mask = await future
            await loop.run_in_executor(pool, finish, prepared.image, mask, options, png_level)

    batching = asyncio.create_task(batcher())
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    batching.cancel()
    pool.shutdown()
    return total / elapsed, sizes


def pipeline(
    model: OnnxModel,
    images: dict[str, bytes],
    requests: int,
    repeats: int,
    batch: Json,
    png_level: int,
    threads: int,
) -> Json:
    """Per-image sequential latency, then throughput at concurrency 16."""
    latency: dict[str, float] = {}
    options, limits = RemoveOptions(), Limits()
    for name, data in images.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            prepared = prepare(data, model.spec, limits)
            mask = model.predict([prepared.model_input])[0]
            finish(prepared.image, mask, options, png_level)
            times.append(time.perf_counter() - started)
        latency[name] = round(statistics.median(times) * 1000, 1)
    rate, sizes = asyncio.run(
        _pipeline_loop(
            model,
            list(images.values()),
            requests,
            16,
            threads,
            int(batch["max_batch_size"]),
            float(batch["batch_wait_timeout_s"]),
            png_level,
        )
    )
    return {
        "latency_ms_by_image": latency,
        "latency_ms_mean": round(statistics.fmean(latency.values()), 1),
        "concurrency": 16,
        "stage_threads": threads,
        "images_per_s": round(rate, 2),
        "batch_sizes_formed": {str(k): v for k, v in sorted(sizes.items())},
    }


# --- HTTP load --------------------------------------------------------------------


@dataclass
class Phase:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    by_image: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    duration_s: float = 0.0

    def summary(self) -> Json:
        ok = self.statuses.get(200, 0)
        return {
            "concurrency": self.concurrency,
            "requests": sum(self.statuses.values()),
            "duration_s": round(self.duration_s, 2),
            "images_per_s": round(ok / self.duration_s, 2) if self.duration_s else 0.0,
            "latency_ms": percentiles(self.latencies) if self.latencies else {},
            "latency_ms_p50_by_image": {
                name: round(statistics.median(v) * 1000, 1)
                for name, v in sorted(self.by_image.items())
            },
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


def post_image(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post(
        "/api/remove", files={"file": (name, data, "image/jpeg")}, data={"model": MODEL}
    )


async def _closed_loop(url: str, images: dict[str, bytes], total: int, phase: Phase) -> None:
    """``phase.concurrency`` clients, each sending its next request on a reply."""
    items = list(images.items())
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=phase.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one_client() -> None:
            for i in counter:
                name, data = items[i % len(items)]
                started = time.perf_counter()
                try:
                    response = await client.post(
                        "/api/remove",
                        files={"file": (name, data, "image/jpeg")},
                        data={"model": MODEL},
                    )
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0  # connection error or timeout
                elapsed = time.perf_counter() - started
                phase.statuses[status] += 1
                if status == 200:
                    phase.latencies.append(elapsed)
                    phase.by_image.setdefault(name, []).append(elapsed)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(phase.concurrency)))
        phase.duration_s = time.perf_counter() - started


def load_phase(
    url: str,
    images: dict[str, bytes],
    total: int,
    concurrency: int,
    counts: Callable[[], Json] | None = None,
) -> Json:
    """A closed loop of ``total`` requests; ``counts`` reads the batch sizes formed."""
    before = counts() if counts else None
    phase = Phase(concurrency)
    asyncio.run(_closed_loop(url, images, total, phase))
    summary = phase.summary()
    if counts and before is not None:
        after = counts()
        summary["batch_sizes_formed"] = {
            k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)
        }
    return summary


# --- process memory -----------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc; Ray's workers hang off raylet)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent pid is the field after the parenthesised command name.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def replica_pids(root: int) -> dict[int, str]:
    """The Serve replica processes under ``root``, by pid, named by their title."""
    return {
        pid: cmd.split()[0] if cmd else "?"
        for pid in _descendants(root)
        if "ServeReplica" in (cmd := _cmdline(pid))
    }


@contextmanager
def rss_sampler(pids: Sequence[int], period_s: float = 0.01) -> Iterator[dict[int, int]]:
    """Peak RSS per pid while the block runs, sampled every ``period_s``."""
    peaks = {pid: rss_bytes(pid) for pid in pids}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(period_s):
            for pid in pids:
                peaks[pid] = max(peaks[pid], rss_bytes(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()


def large_uploads(url: str, paths: dict[str, Path], watch: Sequence[int] = ()) -> dict[str, Json]:
    """One request per large photo; with ``watch``, the peak RSS during each."""
    results: dict[str, Json] = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for name, path in paths.items():
            data = path.read_bytes()
            with Image.open(path) as img:
                width, height = img.size
            baseline = {pid: rss_bytes(pid) for pid in watch}
            with rss_sampler(watch) as peaks:
                started = time.perf_counter()
                response = post_image(client, path.name, data)
                elapsed = time.perf_counter() - started
            rgba = width * height * 4
            result: Json = {
                "size": [width, height],
                "upload_bytes": len(data),
                "status": response.status_code,
                "latency_ms": round(elapsed * 1000, 1),
                "response_bytes": len(response.content),
                "decoded_rgba_bytes": rgba,
            }
            if watch:
                growth = {pid: peaks[pid] - baseline[pid] for pid in watch}
                result["memory"] = {
                    "peak_rss_bytes_total": sum(peaks.values()),
                    "baseline_rss_bytes_total": sum(baseline.values()),
                    "peak_growth_bytes_by_pid": {str(k): v for k, v in growth.items()},
                    # The request's cost: the largest growth of any one replica
                    # (the ingress holds the full-size image; the model sees 320px).
                    "peak_growth_bytes": max(growth.values()),
                    "peak_growth_x_rgba": round(max(growth.values()) / rgba, 2),
                }
            results[name] = result
    return results


# --- 3. the service ------------------------------------------------------------------


@dataclass
class Running:
    url: str
    process: subprocess.Popen[bytes]
    ready_s: float


def start_process(
    argv: list[str], env: dict[str, str], log: Path, url: str, probe: str, timeout_s: float
) -> Running:
    """Start ``argv`` in its own session; wait until GET ``probe`` answers 200."""
    started = time.monotonic()
    with log.open("wb") as handle:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(
                f"{argv[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url + probe, timeout=2).status_code == 200:
                return Running(url, process, time.monotonic() - started)
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_process(process)
    raise RuntimeError(f"not ready in {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGINT first (`serve run` then shuts its local Ray down), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def service_config(tmp: Path, port: int) -> tuple[Path, Json]:
    """serve_config.yaml with only the HTTP port changed; the model's user_config."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    deployments = config["applications"][0].get("deployments", [])
    batch: Json = next(
        (d.get("user_config", {}) for d in deployments if d["name"] == f"Model_{MODEL}"), {}
    )
    args = config["applications"][0]["args"]
    return path, {
        "max_batch_size": batch.get("max_batch_size", 8),
        "batch_wait_timeout_s": batch.get("batch_wait_timeout_s", 0.005),
        "png_compress_level": args.get("png_compress_level", 1),
        "ingress_threads": args.get("ingress_threads") or os.cpu_count() or 1,
        "num_cpus": args.get("num_cpus"),
    }


def batch_counts(url: str) -> Json:
    models = httpx.get(url + "/models", timeout=10).json()["models"]
    counts: Counter[str] = Counter()
    for info in models:
        counts.update({k: int(v) for k, v in info.get("batch_sizes_formed", {}).items()})
    return dict(counts)


def start_service(tmp: Path) -> Running:
    config, _ = service_config(tmp, free_port())
    port = yaml.safe_load(config.read_text())["http_options"]["port"]
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [str(Path(sys.executable).parent / "serve"), "run", str(config)]
    url = f"http://127.0.0.1:{port}"
    try:
        return start_process(argv, env, tmp / "serve.log", url, "/healthz", 300)
    except RuntimeError as exc:
        # A local Ray's start can time out on an overloaded machine: try once more.
        print(f"service start failed, retrying: {str(exc)[-300:]}", file=sys.stderr)
        return start_process(argv, env, tmp / "serve-retry.log", url, "/healthz", 300)


def first_request(url: str, images: dict[str, bytes]) -> tuple[Json, dict[str, bytes]]:
    """The first request after ready, then one output per image (for parity)."""
    outputs: dict[str, bytes] = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        name, data = next(iter(images.items()))
        started = time.perf_counter()
        first = post_image(client, name, data)
        elapsed = time.perf_counter() - started
        for each, body in images.items():
            response = post_image(client, each, body)
            outputs[each] = response.content if response.status_code == 200 else b""
    summary = {"image": name, "status": first.status_code, "latency_ms": round(elapsed * 1000, 1)}
    return summary, outputs


def setup_peer(venv: Path = PEER_VENV) -> Path:
    """A venv of its own for `rembg s`: rembg[cli]'s pins conflict with Ray's."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True)
    # rembg's import JIT-compiles pymatting with numba (minutes on 2 busy cores)
    # and caches it: pay that here, not in the peer's start-up.
    subprocess.run([str(python), "-c", "import rembg.bg"], check=True)
    return python


def rembg_home(tmp: Path) -> Path:
    """A rembg model store holding the embedded u2netp: nothing is downloaded."""
    home = tmp / "rembg-home"
    (home / "models" / MODEL).mkdir(parents=True, exist_ok=True)
    shutil.copy(EMBEDDED[MODEL], home / "models" / MODEL / f"{MODEL}.onnx")
    return home


def start_peer(python: Path, home: Path, tmp: Path) -> Running:
    port = free_port()
    # rembg.cli has no __main__ guard; BROWSER=true stops its startup hook from
    # opening anything.
    argv = [
        str(python),
        "-c",
        "import sys; from rembg.cli import main; sys.exit(main())",
        "s",
        "--no-ui",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-l",
        "warning",
    ]
    # U2NET_HOME, when set, would win over REMBG_HOME and send rembg downloading.
    env = {k: v for k, v in os.environ.items() if k != "U2NET_HOME"}
    env.update(REMBG_HOME=str(home), BROWSER="true")
    return start_process(argv, env, tmp / "peer.log", f"http://127.0.0.1:{port}", "/api", 900)


def drive(
    servers: dict[str, Running],
    images: dict[str, bytes],
    large: dict[str, Path],
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
            counts = partial(batch_counts, running.url) if who == "service" else None
            results[who]["phases"][f"c{c}"] = load_phase(
                running.url, images, max(requests, waves * c), c, counts
            )
    for who, running in servers.items():
        pids = (
            replica_pids(running.process.pid)
            if who == "service"
            else {running.process.pid: "rembg s"}
        )
        results[who]["processes"] = {str(pid): title for pid, title in pids.items()}
        results[who]["large"] = large_uploads(running.url, large, list(pids))
    if "service" in results:
        results["service"]["outputs"] = outputs
    return results


# --- parity -------------------------------------------------------------------------------


def parity(outputs: dict[str, bytes], images: dict[str, bytes], home: Path) -> Json:
    """Served outputs vs rembg.remove in this process: same phash, alpha within 2."""
    import imagehash
    from rembg import new_session, remove

    old = os.environ.get("REMBG_HOME")
    os.environ["REMBG_HOME"] = str(home)
    try:
        session = new_session(MODEL, providers=["CPUExecutionProvider"])
        checks: dict[str, Json] = {}
        for name, data in images.items():
            if not outputs.get(name):
                checks[name] = {"ok": False, "reason": "no served output"}
                continue
            got = Image.open(io.BytesIO(outputs[name]))
            want = Image.open(io.BytesIO(bytes(remove(data, session=session))))
            same_hash = bool(imagehash.phash(got) == imagehash.phash(want))
            diff = 999
            if got.size == want.size and got.mode == want.mode == "RGBA":
                a = np.asarray(got.getchannel("A"), dtype=np.int16)
                b = np.asarray(want.getchannel("A"), dtype=np.int16)
                diff = int(np.abs(a - b).max())
            checks[name] = {
                "ok": same_hash and diff <= 2,
                "same_phash": same_hash,
                "alpha_max_diff": diff,
            }
    finally:
        if old is None:
            os.environ.pop("REMBG_HOME", None)
        else:
            os.environ["REMBG_HOME"] = old
    return {"ok": all(c["ok"] for c in checks.values()), "images": checks}


# --- targets and report -------------------------------------------------------------------


def targets(results: Json) -> list[Json]:
    """The target ratios, each computed from figures of this one run."""
    out: list[Json] = []

    def check(name: str, value: float | None, op: str, target: float) -> None:
        if value is None:
            out.append({"name": name, "value": None, "target": f"{op} {target}", "result": "SKIP"})
            return
        ok = value >= target if op == ">=" else value <= target
        out.append(
            {
                "name": name,
                "value": round(value, 3),
                "target": f"{op} {target}",
                "result": "PASS" if ok else "FAIL",
            }
        )

    service, peer = results.get("service"), results.get("peer")
    limit = results["model_limit"]["images_per_s"]
    pipe = results["pipeline"]
    c16 = service["phases"]["c16"] if service else None
    c1 = service["phases"]["c1"] if service else None
    check("served c16 / model limit", c16["images_per_s"] / limit if c16 else None, ">=", 0.85)
    peer16 = peer["phases"]["c16"]["images_per_s"] if peer else None
    check(
        "served c16 / peer c16", c16["images_per_s"] / peer16 if c16 and peer16 else None, ">=", 1.3
    )
    check(
        "c16 p99 / p50",
        c16["latency_ms"]["p99"] / c16["latency_ms"]["p50"] if c16 else None,
        "<=",
        2.0,
    )
    ratio = None
    if c1:
        by_image = c1["latency_ms_p50_by_image"]
        served = [by_image[n] for n in pipe["latency_ms_by_image"] if n in by_image]
        local = [pipe["latency_ms_by_image"][n] for n in by_image]
        ratio = statistics.fmean(served) / statistics.fmean(local) if served else None
    check("c1 latency / in-process latency", ratio, "<=", 1.15)
    first = None
    if service and c1:
        steady = c1["latency_ms_p50_by_image"].get(service["first_request"]["image"])
        first = service["first_request"]["latency_ms"] / steady if steady else None
    check("first request / steady c1", first, "<=", 1.2)
    big = service["large"].get("24mp") if service else None
    check(
        "24 MP peak growth / RGBA size",
        big["memory"]["peak_growth_x_rgba"] if big and big["status"] == 200 else None,
        "<=",
        5.0,
    )
    if service:
        out.append(
            {
                "name": "parity with rembg",
                "value": service["parity"]["ok"],
                "target": "phash equal, alpha +-2",
                "result": "PASS" if service["parity"]["ok"] else "FAIL",
            }
        )
    return out


def table(results: Json) -> str:
    lines = [f"machine: {results['machine']}", ""]
    limit = results["model_limit"]
    lines.append(
        f"model limit: {limit['images_per_s']} img/s at batch "
        f"{limit['best_batch']} ({limit['images_per_s_by_batch']})"
    )
    pipe = results["pipeline"]
    lines.append(
        f"in-process pipeline: {pipe['images_per_s']} img/s at c16, "
        f"{pipe['latency_ms_mean']} ms per image sequential"
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
    lines += ["", f"{'target':36}{'value':>10}  {'goal':>8}  result"]
    for t in results["targets"]:
        lines.append(f"{t['name']:36}{t['value']!s:>10}  {t['target']:>8}  {t['result']}")
    return "\n".join(lines)


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"load {load}, Python {platform.python_version()}"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rembg-serve bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    parser.add_argument(
        "--requests",
        type=int,
        default=48,
        help="requests per load phase (at least 2x its concurrency)",
    )
    parser.add_argument("--quick", action="store_true", help="few requests (for tests)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--peer-python", type=Path, default=PEER_VENV / "bin" / "python")
    parser.add_argument(
        "--setup-peer",
        action="store_true",
        help=f"create {PEER_VENV.name} with {' '.join(PEER_REQUIREMENTS)}",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    requests = 8 if args.quick else args.requests
    # Quick: one request per client at c64; otherwise at least two rounds.
    waves = 1 if args.quick else 2
    seconds = 0.0 if args.quick else 3.0
    images = shared_images()
    results: Json = {"machine": machine(), "argv": sys.argv[1:] if argv is None else argv}
    with tempfile.TemporaryDirectory(prefix="rembg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        _, batch = service_config(tmp, 0)
        results["config"] = batch

        def measure_local() -> None:
            model = load_model(8)
            print("measuring the model limit ...", flush=True)
            results["model_limit"] = model_limit(model, list(images.values()), seconds)
            print("measuring the in-process pipeline ...", flush=True)
            results["pipeline"] = pipeline(
                model,
                images,
                requests if args.quick else max(requests, 32),
                1 if args.quick else 3,
                batch,
                int(batch["png_compress_level"]),
                int(batch["ingress_threads"]),
            )

        large = large_images(
            tmp, images["car-1.jpg"] if "car-1.jpg" in images else next(iter(images.values()))
        )
        home = rembg_home(tmp)
        python = args.peer_python
        if not args.skip_peer:
            if args.setup_peer:
                python = setup_peer()
            if not python.exists():
                print(f"no peer python at {python}: run with --setup-peer", file=sys.stderr)
                return 2
        servers: dict[str, Running] = {}
        with ExitStack() as stack:
            # The peer first: the service's first request must follow its ready.
            if not args.skip_peer:
                print("starting the peer (rembg s) ...", flush=True)
                servers["peer"] = start_peer(python, home, tmp)
                stack.callback(stop_process, servers["peer"].process)
            if not args.skip_service:
                print("starting the service ...", flush=True)
                servers = {"service": start_service(tmp), **servers}
                stack.callback(stop_process, servers["service"].process)
            if servers:
                results.update(drive(servers, images, large, requests, waves, measure_local))
            else:
                measure_local()
        if "service" in results:
            outputs = results["service"].pop("outputs")
            results["service"]["parity"] = parity(outputs, images, home)
    results["targets"] = targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
