"""What the tests and the benchmarks share: a service on a free port, its config,
load, process memory, and the comparison with rembg.

A service is started the way vLLM's ``RemoteOpenAIServer`` starts one: `serve run`
as a subprocess in its own session, on a free port, ready when its health route
answers within a timeout, always stopped afterwards.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from PIL import Image

from deployments.models import EMBEDDED
from deployments.settings import load_serve_config, merged, service_app

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SERVE_CONFIG = ROOT / "serve_config.yaml"

Json = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shared_images() -> dict[str, bytes]:
    """rembg's own test photos, by file name."""
    return {p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*-1.jpg"))}


# --- configs ---------------------------------------------------------------------------


def serve_config(
    port: int,
    *,
    args: Mapping[str, Any] | None = None,
    deployments: Mapping[str, Mapping[str, Any]] | None = None,
    top: Mapping[str, Any] | None = None,
    source: Path = SERVE_CONFIG,
) -> Json:
    """serve_config.yaml on ``port``, with edits merged into the app's args, into the
    named deployments' options and into the top level (``http_options``, ...)."""
    config = merged(merged(load_serve_config(source), top or {}), {"http_options": {"port": port}})
    app = service_app(config)
    app["args"] = merged(app["args"], args or {})
    edits = dict(deployments or {})
    app["deployments"] = [merged(d, edits.get(d["name"], {})) for d in app["deployments"]]
    return config


def write_config(directory: Path, config: Json, name: str = "serve_config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def deployment_options(config: Json, name: str) -> Json:
    """The options block of deployment ``name`` in a serve config."""
    options: Json = next(d for d in config["applications"][0]["deployments"] if d["name"] == name)
    return options


# --- processes ---------------------------------------------------------------------------


@dataclass
class Running:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    ready_s: float

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


def start_process(
    argv: Sequence[str],
    env: Mapping[str, str],
    log: Path,
    url: str,
    probe: str,
    timeout_s: float,
    cwd: Path = ROOT,
) -> Running:
    """Start ``argv`` in its own session; wait until GET ``url + probe`` answers 200."""
    started = time.monotonic()
    with log.open("wb") as handle:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
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
                return Running(url, process, log, time.monotonic() - started)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError(f"not ready in {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM to its process group (`serve run` in the background ignores SIGINT;
    on SIGTERM it stops its local Ray), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    _no_leftovers(process.pid)


def _no_leftovers(session_id: int, grace_s: float = 15) -> None:
    """Every process the service started ends with it: what is left after ``grace_s``
    is killed, and a ``haproxy`` among it is an error (it would hold the ports)."""
    deadline = time.monotonic() + grace_s
    while (left := session_processes(session_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    outlived = {pid: title for pid, title in left.items() if "haproxy" in title}
    if outlived:
        raise RuntimeError(f"haproxy outlived the service it served: {outlived}")


def serve_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a `serve run` that starts its own local Ray, with ports of its
    own where Serve's fast path has machine-wide defaults: HAProxy's stats and metrics
    (8404, 9101: a second service would fail to start), the ingress replicas' direct
    HTTP and gRPC ranges (from 30000 and 40000) and the fallback proxy behind HAProxy
    (8500, 9500), bound with SO_REUSEPORT: a second service's HAProxy would send
    requests to the first one's replicas."""
    http, grpc = free_port(), free_port()
    ports = {
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + 16),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 16),
    }
    return {
        **os.environ,
        "RAY_ADDRESS": "local",
        "RAY_USAGE_STATS_ENABLED": "0",
        **ports,
        **(extra or {}),
    }


def start_service(
    config: Path,
    log: Path,
    timeout_s: float = 300,
    env: Mapping[str, str] | None = None,
    bin_dir: Path | None = None,
    cwd: Path = ROOT,
) -> Running:
    """`rembg-serve up CONFIG` (README's start: `serve run CONFIG` with Serve's fast
    path on, unless ``env`` turns it off) with its own local Ray; ready when /healthz
    answers 200.

    ``bin_dir``: another virtualenv's bin folder, run in ``cwd``. A local Ray's start
    can time out on an overloaded machine: it is tried twice.
    """
    port = load_serve_config(config)["http_options"]["port"]
    argv = [str((bin_dir or Path(sys.executable).parent) / "rembg-serve"), "up", str(config)]
    url = f"http://127.0.0.1:{port}"
    try:
        return start_process(argv, serve_env(env), log, url, "/healthz", timeout_s, cwd)
    except RuntimeError as exc:
        print(f"service start failed, retrying: {str(exc)[-300:]}", file=sys.stderr)
        retry_log = log.with_name(log.stem + "-retry" + log.suffix)
        return start_process(argv, serve_env(env), retry_log, url, "/healthz", timeout_s, cwd)


@contextmanager
def running_service(
    directory: Path, config: Json, timeout_s: float = 300, env: Mapping[str, str] | None = None
) -> Iterator[Running]:
    """``config`` served by `serve run` for the duration of the block."""
    path = write_config(directory, config)
    service = start_service(path, directory / "serve.log", timeout_s, env)
    try:
        yield service
    finally:
        stop_process(service.process)


# --- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One request: its status (0: it raised: timeout, reset, refused) and timing."""

    status: int
    started: float
    ended: float
    image: str = ""
    retry_after: str | None = None
    error: str = ""
    # Sends it took (more than one only for a retrying client).
    attempts: int = 1

    @property
    def seconds(self) -> float:
        return self.ended - self.started


Send = Callable[[httpx.Client, str, bytes], httpx.Response]


def post_raw(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    """``POST /remove`` with the image as the body."""
    return client.post("/remove", content=data)


def post_rembg(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    """rembg's ``POST /api/remove``: multipart ``file`` and the model field."""
    return client.post(
        "/api/remove", files={"file": (name, data, "image/jpeg")}, data={"model": "u2netp"}
    )


class Load:
    """``clients`` closed-loop clients, each sending its next image when answered.

    Runs until ``total`` requests were sent, ``seconds`` passed or ``stop()``. A
    client that gets a 503 waits ``after_503_s`` (None: the Retry-After it was
    given, at most ``max_wait_s``) before its next request. A ``retrying`` client
    sends the same image again after a 503, a connection error or a 5xx that is not
    this service's JSON (Serve's proxy answers a plain 500 for a request whose
    ingress replica died under it), up to 60 times: removing a background is
    idempotent. Every final answer is kept as an ``Outcome``.
    """

    def __init__(
        self,
        url: str,
        images: Mapping[str, bytes],
        clients: int,
        *,
        total: int | None = None,
        seconds: float | None = None,
        after_503_s: float | None = None,
        send: Send = post_raw,
        timeout_s: float = 120,
        retrying: bool = False,
        max_wait_s: float = 30,
        ramp_s: float = 0.0,
    ) -> None:
        self.url = url
        self.items = list(images.items())
        self.clients = clients
        self.total = total
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.after_503_s = after_503_s
        self.send = send
        self.timeout_s = timeout_s
        self.retrying = retrying
        self.max_wait_s = max_wait_s
        # Clients start one after another over ``ramp_s`` (0: all at once).
        self.ramp_s = ramp_s
        self.outcomes: list[Outcome] = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.current: dict[int, float] = {}
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        # One TLS context for all the clients: httpx builds one per client otherwise
        # (~20 ms of CPU each, loading the CA bundle), which a crowd arriving at
        # once takes from the service it measures on the same machine.
        self.tls = ssl.create_default_context()
        self.started = 0.0
        self.duration_s = 0.0

    def _next(self) -> int | None:
        with self.lock:
            if self.stopped.is_set() or (self.total is not None and self.sent >= self.total):
                return None
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return None
            self.sent += 1
            return self.sent - 1

    def _client(self, index: int) -> None:
        if self.ramp_s and self.stopped.wait(self.ramp_s * index / self.clients):
            return
        with httpx.Client(base_url=self.url, timeout=self.timeout_s, verify=self.tls) as client:
            while (i := self._next()) is not None:
                name, data = self.items[i % len(self.items)]
                started = time.perf_counter()
                with self.lock:
                    self.current[index] = started
                attempts = 0
                while True:
                    attempts += 1
                    status, retry_after, error, again = self._send(client, name, data)
                    if not (self.retrying and again) or attempts >= 60 or self.stopped.is_set():
                        break
                    self.stopped.wait(min(float(retry_after or 0.5), 1.0))
                outcome = Outcome(
                    status, started, time.perf_counter(), name, retry_after, error, attempts
                )
                with self.lock:
                    del self.current[index]
                    self.outcomes.append(outcome)
                if status == 503 and not self.retrying:
                    wait = self.after_503_s
                    if wait is None:
                        wait = float(retry_after) if retry_after else 1.0
                    self.stopped.wait(min(wait, self.max_wait_s))

    def _send(
        self, client: httpx.Client, name: str, data: bytes
    ) -> tuple[int, str | None, str, bool]:
        """(status, Retry-After, error text, whether a retrying client sends again)."""
        try:
            response = self.send(client, name, data)
        except httpx.HTTPError as exc:
            return 0, None, repr(exc), True
        status, retry_after = response.status_code, response.headers.get("retry-after")
        error = "" if status == 200 else response.text[:300]
        ours = response.headers.get("content-type") == "application/json"
        again = status == 503 or (status >= 500 and not ours)
        return status, retry_after, error, again

    def start(self) -> Load:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()
        return self

    def join(self) -> Load:
        for thread in self.threads:
            thread.join()
        self.duration_s = time.perf_counter() - self.started
        return self

    def stop(self) -> Load:
        self.stopped.set()
        return self.join()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def in_flight(self) -> int:
        """Requests sent and not yet answered, now."""
        with self.lock:
            return len(self.current)

    def statuses(self) -> Counter[int]:
        with self.lock:
            return Counter(o.status for o in self.outcomes)

    def summary(self) -> Json:
        """Requests, statuses, images/s of 200s over the run, latency of the 200s."""
        ok = [o for o in self.outcomes if o.status == 200]
        by_image: dict[str, list[float]] = {}
        for o in ok:
            by_image.setdefault(o.image, []).append(o.seconds)
        return {
            "concurrency": self.clients,
            "requests": len(self.outcomes),
            "duration_s": round(self.duration_s, 2),
            "images_per_s": round(len(ok) / self.duration_s, 2) if self.duration_s else 0.0,
            "latency_ms": percentiles([o.seconds for o in ok]) if ok else {},
            "latency_ms_p50_by_image": {
                name: round(statistics.median(v) * 1000, 1) for name, v in sorted(by_image.items())
            },
            "statuses": {str(k): v for k, v in sorted(self.statuses().items())},
        }


def run_load(url: str, images: Mapping[str, bytes], clients: int, **kwargs: Any) -> Load:
    """A ``Load`` run to its end (give ``total`` or ``seconds``)."""
    return Load(url, images, clients, **kwargs).start().join()


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


# --- process memory ------------------------------------------------------------------------


def _proc(pid: int, name: str) -> str:
    try:
        return (Path("/proc") / str(pid) / name).read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _status_kb(pid: int, key: str) -> int:
    for line in _proc(pid, "status").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (Linux /proc), 0 once it is gone."""
    return _status_kb(pid, "VmRSS")


def private_bytes(pid: int) -> int:
    """The process's own resident memory (RssAnon): without the pages of files and of
    shared memory it has touched, such as Ray's object store, which is bounded and
    accounted for on its own."""
    return _status_kb(pid, "RssAnon")


def shared_bytes(pid: int) -> int:
    """The resident pages ``pid`` maps from files and shared memory (RssFile + RssShmem),
    such as Ray's object store: the part of its RSS that ``private_bytes`` leaves out."""
    return _status_kb(pid, "RssFile") + _status_kb(pid, "RssShmem")


def session_processes(session_id: int, marker: str = "") -> dict[int, str]:
    """Processes of one session (a `serve run` started by ``start_process`` and every
    Ray process it spawned) whose command line holds ``marker``: pid -> its title."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc(int(entry.name), "stat")
        try:
            # Fields after the ")" closing the command name: state ppid pgrp session ...
            session = int(stat.rsplit(")", 1)[1].split()[3])
        except (IndexError, ValueError):
            continue
        cmdline = _proc(int(entry.name), "cmdline").replace("\0", " ").strip()
        if session == session_id and marker in cmdline:
            found[int(entry.name)] = cmdline.split()[0] if cmdline else "?"
    return found


def serve_replicas(session_id: int) -> dict[int, str]:
    """The Serve replicas of one service: pid -> deployment (Ingress, Model_u2netp, ...)."""
    replicas = {}
    for pid, title in session_processes(session_id, "ServeReplica:").items():
        # "ray::ServeReplica:APP:DEPLOYMENT.method_running_now"
        replicas[pid] = title.split(".")[0].split(":")[-1]
    return replicas


def proxies(session_id: int) -> list[int]:
    """Serve's HTTP proxy actors of one service; with ``RAY_SERVE_ENABLE_HA_PROXY=1``,
    the HAProxy manager actors and the ``haproxy`` processes they run instead."""
    markers = ("ProxyActor", "HAProxyManager", "haproxy -db")
    return sorted({pid for m in markers for pid in session_processes(session_id, m)})


@contextmanager
def rss_peaks(
    pids: Sequence[int], period_s: float = 0.01, measure: Callable[[int], int] = rss_bytes
) -> Iterator[dict[int, int]]:
    """Peak RSS (or ``measure``) per pid while the block runs, sampled every ``period_s``."""
    peaks = {pid: measure(pid) for pid in pids}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(period_s):
            for pid in pids:
                peaks[pid] = max(peaks[pid], measure(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (Linux /proc)."""
    fields = _proc(pid, "stat").rsplit(")", 1)[-1].split()
    if len(fields) < 13:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


# --- rembg's reference and the comparison with it ----------------------------------------------


def rembg_home(directory: Path, model: str = "u2netp") -> Path:
    """A rembg model store holding the embedded model: nothing is downloaded."""
    home = directory / "rembg-home"
    (home / "models" / model).mkdir(parents=True, exist_ok=True)
    shutil.copy(EMBEDDED[model], home / "models" / model / f"{model}.onnx")
    return home


def rembg_reference(images: Mapping[str, bytes], home: Path) -> dict[str, bytes]:
    """``rembg.remove(data, session=new_session("u2netp"))`` on each image."""
    old = os.environ.get("REMBG_HOME")
    os.environ["REMBG_HOME"] = str(home)
    try:
        from rembg import new_session, remove

        session = new_session("u2netp", providers=["CPUExecutionProvider"])
        return {name: bytes(remove(data, session=session)) for name, data in images.items()}
    finally:
        if old is None:
            os.environ.pop("REMBG_HOME", None)
        else:
            os.environ["REMBG_HOME"] = old


@dataclass(frozen=True)
class Parity:
    """How a served image compares with rembg's: pixel for pixel, then how far apart."""

    identical: bool
    size_and_mode: bool
    max_rgb_diff: int = -1
    max_alpha_diff: int = -1
    differing_pixels: int = -1
    same_phash: bool = False
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> Json:
        return {
            "identical": self.identical,
            "max_rgb_diff": self.max_rgb_diff,
            "max_alpha_diff": self.max_alpha_diff,
            "differing_pixels": self.differing_pixels,
            "same_phash": self.same_phash,
        }


def compare(ours: bytes, reference: bytes) -> Parity:
    """Decoded RGBA, pixel for pixel; the perceptual hash only as a diagnostic."""
    import imagehash

    got, want = Image.open(io.BytesIO(ours)), Image.open(io.BytesIO(reference))
    same_phash = bool(imagehash.phash(got) == imagehash.phash(want))
    if got.size != want.size or got.mode != want.mode:
        return Parity(False, False, same_phash=same_phash)
    a = np.asarray(got.convert("RGBA"), dtype=np.int16)
    b = np.asarray(want.convert("RGBA"), dtype=np.int16)
    diff = np.abs(a - b)
    return Parity(
        identical=bool(np.array_equal(a, b)),
        size_and_mode=True,
        max_rgb_diff=int(diff[..., :3].max()),
        max_alpha_diff=int(diff[..., 3].max()),
        differing_pixels=int(diff.any(axis=-1).sum()),
        same_phash=same_phash,
    )
