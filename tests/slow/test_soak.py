"""Soak: minutes of steady concurrency; no errors, no memory creep.

RSS of the Serve replicas is measured after a warm-up (allocator pools, ONNX
Runtime arenas and thread pools fill during the first requests) and again at the
end; growth beyond 5% would be a leak. Sized in time, not requests, so that it
takes the same ~6 minutes on machines of any speed (SOAK_SECONDS, default 300,
after 60 s of warm-up).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from conftest import Service, free_port, serve_config, start_test_service
from deployments.bench.harness import (
    percentiles,
    rss_bytes,
    run_load,
    serve_replicas,
    shared_images,
    stop_process,
)

pytestmark = pytest.mark.slow

CONCURRENCY = 16
WARMUP_S = 60
SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
MAX_GROWTH = 0.05
IDLE_S = 5


@pytest.fixture(scope="module")
def soak_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # Fixed replica counts: the autoscaler would otherwise add (and measure) new ones.
    fixed = {"autoscaling_config": None, "num_replicas": 1}
    config = serve_config(free_port(), deployments={"Ingress": fixed, "Model_u2netp": fixed})
    running = start_test_service(tmp_path_factory.mktemp("soak"), config)
    try:
        yield running
    finally:
        stop_process(running.process)


def test_soak(soak_service: Service) -> None:
    images = shared_images()
    warm = run_load(soak_service.url, images, CONCURRENCY, seconds=WARMUP_S)
    replicas = serve_replicas(soak_service.process.pid)
    # Both readings at rest: an idle ingress gives its freed C heap back within
    # 2 s (IdleTrimmer); read under load, RSS holds the work in flight.
    time.sleep(IDLE_S)
    before = {pid: rss_bytes(pid) for pid in replicas}
    started = time.monotonic()
    load = run_load(soak_service.url, images, CONCURRENCY, seconds=SECONDS)
    duration = time.monotonic() - started
    time.sleep(IDLE_S)
    after = {pid: rss_bytes(pid) for pid in replicas}

    errors = [o for o in warm.outcomes + load.outcomes if o.status != 200]
    latency = percentiles([o.seconds for o in load.outcomes if o.status == 200])
    lines = [
        f"\nsoak: {len(load.outcomes)} requests after {len(warm.outcomes)} in {WARMUP_S}s of "
        f"warm-up, concurrency {CONCURRENCY}, {duration:.0f}s "
        f"({len(load.outcomes) / duration:.2f} images/s), {len(errors)} errors",
        f"  latency p50 {latency['p50']:.0f} ms, p99 {latency['p99']:.0f} ms",
    ]
    growth: dict[str, float] = {}
    for pid, name in replicas.items():
        growth[name] = after[pid] / before[pid] - 1 if after[pid] else float("inf")
        lines.append(
            f"  {name} (pid {pid}): RSS {before[pid] / 2**20:.1f} -> "
            f"{after[pid] / 2**20:.1f} MiB ({growth[name]:+.2%})"
        )
    print("\n".join(lines))

    assert not errors, errors[:5]
    # The replicas measured before are still the ones serving (none died).
    assert set(replicas) == set(serve_replicas(soak_service.process.pid)), replicas
    assert all(g <= MAX_GROWTH for g in growth.values()), growth
