"""Soak: thousands of requests at steady concurrency; no errors, no memory creep.

RSS of the Serve replicas is measured after a warm-up (allocator pools, ONNX
Runtime arenas and thread pools fill during the first requests) and again at the
end; growth beyond 5% would be a leak. Takes ~7 minutes on a 2-core machine
(2100 requests at ~5 images/s), longer when the machine is shared.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from test_overload import BODIES, Outcome, replica_rss, send, service_config

from conftest import Service, start_service, stop_service

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CONCURRENCY = 16
WARMUP = 100
REQUESTS = int(os.environ.get("SOAK_REQUESTS", "2000"))
MAX_GROWTH = 0.05


@pytest.fixture(scope="module")
def soak_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("soak")
    running = start_service(service_config(tmp), tmp / "serve.log")
    try:
        yield running
    finally:
        stop_service(running.process)


def run(url: str, count: int, offset: int = 0) -> list[Outcome]:
    """``count`` requests over the shared images, ``CONCURRENCY`` at a time."""
    local = threading.local()

    def one(i: int) -> Outcome:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=120)
        return send(local.client, BODIES[i % len(BODIES)])

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, range(offset, offset + count)))


def test_soak(soak_service: Service) -> None:
    sid = soak_service.process.pid
    warm = run(soak_service.url, WARMUP)
    before = replica_rss(sid)
    started = time.monotonic()
    outcomes = run(soak_service.url, REQUESTS, WARMUP)
    duration = time.monotonic() - started
    after = replica_rss(sid)

    errors = [o for o in warm + outcomes if o.status != 200]
    latencies = sorted(o.seconds for o in outcomes)
    lines = [
        f"\nsoak: {REQUESTS} requests after {WARMUP} warm-up, concurrency {CONCURRENCY}, "
        f"{duration:.0f}s ({REQUESTS / duration:.2f} images/s), {len(errors)} errors",
        f"  latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {latencies[int(0.99 * len(latencies))] * 1000:.0f} ms",
    ]
    growth: dict[str, float] = {}
    for pid, (name, rss) in before.items():
        if pid in after:
            growth[name] = after[pid][1] / rss - 1
            lines.append(
                f"  {name} (pid {pid}): RSS {rss / 2**20:.1f} -> "
                f"{after[pid][1] / 2**20:.1f} MiB ({growth[name]:+.2%})"
            )
    total_before = sum(rss for _, rss in before.values())
    total_after = sum(rss for pid, (_, rss) in after.items() if pid in before)
    lines.append(
        f"  total: {total_before / 2**20:.1f} -> {total_after / 2**20:.1f} MiB "
        f"({total_after / total_before - 1:+.2%})"
    )
    print("\n".join(lines))

    assert not errors, errors[:5]
    # The replicas measured before are still the ones serving (none died).
    assert before and set(before) <= set(after), (before, after)
    assert all(g <= MAX_GROWTH for g in growth.values()), growth
