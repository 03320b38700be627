"""Overload: ten times more clients than the service admits.

The excess must get a quick 503 with Retry-After (never a timeout or a reset),
admitted requests must keep the throughput of an unloaded run, and the replicas'
memory must stay bounded. Figures are printed (`pytest -s`) for the README.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import SHARED_IMAGES, Service, free_port, serve_config
from deployments.bench.harness import start_service, stop_process, write_config

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# The ingress works on ADMITTED requests at once and Serve's proxy queues QUEUED
# more (serve_config.yaml's max_ongoing_requests and max_queued_requests).
ADMITTED = 4
QUEUED = 4
CLIENTS = 10 * (ADMITTED + QUEUED)
BODIES = [p.read_bytes() for p in SHARED_IMAGES]


def replica_rss(session_id: int) -> dict[int, tuple[str, int]]:
    """pid -> (Serve replica name, RSS bytes) of the replicas of one service.

    `serve run` is started in its own session (conftest) and every Ray process it
    spawns inherits it: the session id tells this service's replicas from those
    of other services on the machine. Linux /proc, as psutil would read it.
    """
    found: dict[int, tuple[str, int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (proc / "stat").read_text()
            status = (proc / "status").read_text()
        except OSError:
            continue
        if "ServeReplica:" not in cmdline:
            continue
        # Fields after the ")" closing the command name: state ppid pgrp session ...
        if int(stat.rsplit(")", 1)[1].split()[3]) != session_id:
            continue
        rss_kb = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
        )
        name = cmdline.split("ServeReplica:", 1)[1].split()[0].split(".")[0]
        found[int(proc.name)] = (name, rss_kb * 1024)
    return found


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: the request raised (timeout, reset, refused)
    seconds: float
    retry_after: str | None = None
    error: str = ""


def send(client: httpx.Client, body: bytes) -> Outcome:
    started = time.perf_counter()
    try:
        response = client.post("/remove", content=body)
    except httpx.HTTPError as exc:
        return Outcome(0, time.perf_counter() - started, error=repr(exc))
    return Outcome(
        response.status_code, time.perf_counter() - started, response.headers.get("retry-after")
    )


def hammer(
    url: str,
    clients: int,
    seconds: float,
    pause_after_503_s: float = 0.5,
    bodies: Sequence[bytes] = BODIES,
    timeout_s: float = 60,
) -> list[Outcome]:
    """``clients`` threads, each one request at a time, for ``seconds``.

    A client that gets a 503 waits ``pause_after_503_s`` (shorter than the
    Retry-After it is given, to keep the pressure on) before its next request.
    """
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            i = index
            while time.monotonic() < deadline:
                outcome = send(client, bodies[i % len(bodies)])
                i += 1
                with lock:
                    outcomes.append(outcome)
                if outcome.status == 503:
                    time.sleep(pause_after_503_s)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def p95(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def service_config(tmp: Path, ingress: dict[str, int] | None = None) -> Path:
    """serve_config.yaml with a free port, one replica each and Ingress edits.

    Fixed replica counts keep the capacity the test reasons about fixed: the
    autoscaler would otherwise add an ingress replica (and admission slots).
    """
    config = serve_config(free_port())
    path = write_config(tmp, config)
    for deployment in config["applications"][0]["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        if deployment["name"] == "Ingress":
            deployment.update(ingress or {})
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def small_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("overload")
    queue = {"max_ongoing_requests": ADMITTED, "max_queued_requests": QUEUED}
    running = start_service(service_config(tmp, queue), tmp / "serve.log")
    try:
        yield running
    finally:
        stop_process(running.process)


def test_excess_gets_quick_503_and_admitted_keep_throughput(small_service: Service) -> None:
    url = small_service.url
    sid = small_service.process.pid
    # Warm-up, then the unloaded run: exactly as many clients as are admitted.
    hammer(url, ADMITTED, 5)
    rss_before = replica_rss(sid)
    unloaded_s = 25.0
    unloaded = hammer(url, ADMITTED, unloaded_s)
    assert {o.status for o in unloaded} == {200}, {o.status for o in unloaded}
    unloaded_rate = len(unloaded) / unloaded_s

    peak: dict[int, int] = {}
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.wait(0.5):
            for pid, (_, rss) in replica_rss(sid).items():
                peak[pid] = max(peak.get(pid, 0), rss)

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    loaded_s = 30.0
    try:
        loaded = hammer(url, CLIENTS, loaded_s)
    finally:
        stop.set()
        sampler.join()

    ok = [o for o in loaded if o.status == 200]
    refused = [o for o in loaded if o.status == 503]
    broken = [o for o in loaded if o.status not in (200, 503)]
    loaded_rate = len(ok) / loaded_s
    time_to_503 = p95([o.seconds for o in refused]) if refused else float("nan")
    latency_200 = statistics.median(o.seconds for o in ok)
    print(
        f"\noverload: {CLIENTS} clients, {ADMITTED} admitted + {QUEUED} queued\n"
        f"  unloaded: {unloaded_rate:.2f} images/s ({len(unloaded)} in {unloaded_s:.0f}s)\n"
        f"  loaded:   {loaded_rate:.2f} images/s of 200s ({len(ok)}), {len(refused)} x 503, "
        f"{len(broken)} other\n"
        f"  503 p95 {time_to_503 * 1000:.0f} ms, max {max(o.seconds for o in refused) * 1000:.0f}"
        f" ms; 200 median {latency_200 * 1000:.0f} ms\n"
        f"  replica RSS before (MiB): "
        f"{ {n: r >> 20 for n, r in rss_before.values()} }\n"
        f"  replica RSS peak under overload (MiB): "
        f"{ {rss_before.get(p, ('new', 0))[0]: r >> 20 for p, r in peak.items()} }"
    )
    # No timeouts, resets or 5xx other than the 503s.
    assert not broken, broken[:5]
    assert refused, "nobody was refused: the admission limit did not apply"
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    # The 503 comes quickly: faster than a served request (generous for a noisy box).
    assert time_to_503 < latency_200
    # Admitted requests keep at least half the unloaded throughput.
    assert loaded_rate >= 0.5 * unloaded_rate
    # Memory stays bounded: no replica grows by half under 10x the admitted load.
    for pid, rss in peak.items():
        if pid in rss_before:
            assert rss <= 1.5 * rss_before[pid][1], (rss_before[pid], rss)
    # And afterwards the service answers as before.
    with small_service.client() as client:
        assert client.post("/remove", content=BODIES[0]).status_code == 200
