"""Overload: ten times more clients than the service can serve in time, on a model
running at half speed.

The service admits a request only while its measured rate says the request can
finish within ``deadline_s``; the rest get a quick 503 with a Retry-After from the
expected drain time (and beyond the count caps, Serve's proxy answers 503 itself).
So: only 200s and 503s (never a 408 or a timeout), 95 % of 503s within 100 ms
(the test fails at 300 ms: machines of this kind differ up to ~3x in speed),
admitted requests at >= 80% of the unloaded throughput, /healthz 200 throughout
(busy is not down), and bounded memory. Figures are printed (`pytest -s`).

"Half as fast" is made, not found: the model replica gets one CPU, so ONNX
Runtime runs one thread instead of two (measured here: 0.80 against 1.55 images/s
for the session alone).
"""

from __future__ import annotations

import io
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import Service, free_port, serve_config, service_with_own_ray
from deployments.bench.harness import (
    Load,
    Outcome,
    deployment_options,
    private_bytes,
    proxies,
    rss_bytes,
    rss_peaks,
    run_load,
    serve_replicas,
    shared_bytes,
    shared_images,
)
from deployments.settings import AppSettings

pytestmark = pytest.mark.slow

CLIENTS = 160
LOADED_S = 60.0
UNLOADED_CLIENTS = 4
UNLOADED_S = 30.0
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)"


@dataclass(frozen=True)
class Observed:
    service: Service
    ray_tmp: Path

    def served_ms(self, status: int, since: float = 0.0) -> tuple[str, list[float]]:
        """The service's own time per request answered ``status``, for the requests
        answered at or after ``since`` (epoch seconds): Serve's proxy's access log, or
        with HAProxy in front (its log goes to syslog) the ingress replica's. With
        the name of the log it came from."""
        logs = self.ray_tmp / "ray" / "session_latest" / "logs" / "serve"
        for source, pattern in (("Serve's proxy", "proxy_*"), ("the ingress", "replica_*Ingress*")):
            found = []
            for log in logs.glob(pattern):
                for line in log.read_text(errors="replace").splitlines():
                    # A text line ("INFO 2026-12-03 04:05:49,460 ...") or a JSON one.
                    match = re.search(STAMP + rf",(\d+).*POST /remove {status} ([\d.]+)ms", line)
                    if match:
                        stamp = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S"))
                        if stamp + int(match[2]) / 1000 >= since:
                            found.append(float(match[3]))
            if found:
                return source, found
        return "no log", []


@pytest.fixture(scope="module")
def half_speed() -> Iterator[Observed]:
    # Fixed replica counts: the capacity the test reasons about stays fixed.
    fixed = {"autoscaling_config": None, "num_replicas": 1}
    config = serve_config(
        free_port(),
        args={"num_cpus": 1},
        deployments={"Ingress": fixed, "Model_u2netp": fixed},
    )
    # Its own Ray temp dir, to read Serve's logs.
    with service_with_own_ray(config) as running:
        yield Observed(running, running.log.parent)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def test_overload_gets_quick_503s_and_keeps_throughput(half_speed: Observed) -> None:
    service, images = half_speed.service, shared_images()
    url = service.url
    Load(url, images, UNLOADED_CLIENTS, seconds=10).start().join()  # warm-up
    unloaded = Load(url, images, UNLOADED_CLIENTS, seconds=UNLOADED_S).start().join()
    assert set(unloaded.statuses()) == {200}, unloaded.statuses()
    unloaded_rate = unloaded.statuses()[200] / unloaded.duration_s

    replicas = serve_replicas(service.process.pid)
    health: list[int] = []
    stop = threading.Event()

    def probe_health() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.wait(2.0):
                try:
                    health.append(client.get("/healthz").status_code)
                except httpx.HTTPError:
                    health.append(0)

    prober = threading.Thread(target=probe_health)
    pids = list(replicas)
    with rss_peaks(pids, 0.5) as peaks, rss_peaks(pids, 0.5, private_bytes) as own:
        baseline, own_baseline = dict(peaks), dict(own)
        prober.start()
        # The crowd arrives over 5 s; each client honours Retry-After, as the
        # Python client and the CLI do.
        flood = Load(url, images, CLIENTS, seconds=LOADED_S, timeout_s=120, ramp_s=5)
        arrived = time.time() + 10  # the crowd's arrival is over
        flood.start().join()
        stop.set()
        prober.join()

    # Served throughput counts the 200s answered during the flood.
    ok = [o for o in flood.outcomes if o.status == 200]
    refused = [o for o in flood.outcomes if o.status == 503]
    other = [o for o in flood.outcomes if o.status not in (200, 503)]
    loaded_rate = len(ok) / flood.duration_s
    refuse_p95 = p95([o.seconds for o in refused]) if refused else float("nan")
    settled = [o.seconds for o in refused if o.started > flood.started + 10]
    settled_p95 = p95(settled) if settled else float("nan")
    source, proxy_503 = half_speed.served_ms(503)
    _, proxy_settled = half_speed.served_ms(503, since=arrived)
    served_p50 = statistics.median(o.seconds for o in ok)
    ours = sum(1 for o in refused if o.error.startswith("{"))
    print(
        f"\noverload on a half-speed model: {CLIENTS} clients for {LOADED_S:.0f}s\n"
        f"  unloaded ({UNLOADED_CLIENTS} clients): {unloaded_rate:.2f} images/s\n"
        f"  loaded: {loaded_rate:.2f} images/s of 200s ({len(ok)}, "
        f"{loaded_rate / unloaded_rate:.0%} kept), {len(refused)} x 503 ({ours} from the "
        f"ingress's deadline, {len(refused) - ours} from Serve's proxy caps), {len(other)} other\n"
        f"  503 p95 at the clients {refuse_p95 * 1000:.0f} ms (after the first 10 s: "
        f"{settled_p95 * 1000:.0f} ms), in {source}'s log p50 "
        f"{statistics.median(proxy_503):.0f} ms, p95 {p95(proxy_503):.0f} ms "
        f"(goal < 100 ms: {'met' if p95(proxy_503) < 100 else 'NOT MET'}; after the "
        f"first 10 s: {len(proxy_settled)} of them, p95 "
        f"{p95(proxy_settled) if proxy_settled else float('nan'):.0f} ms)\n"
        f"  200 p50 {served_p50:.1f} s, max {max(o.seconds for o in ok):.1f} s\n"
        f"  /healthz during the flood: {health}\n"
        f"  RSS MiB before -> peak: "
        f"{ {n: (baseline[p] >> 20, peaks[p] >> 20) for p, n in replicas.items()} }; "
        f"of it private (without Ray's shared object store): "
        f"{ {n: (own_baseline[p] >> 20, own[p] >> 20) for p, n in replicas.items()} }"
    )
    assert not other, summarize(other)
    assert refused, "nobody was refused: admission did not apply"
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in refused)
    # A refusal is answered without doing the work. The goal: 95 % of them within
    # 100 ms in Serve's proxy (the service's own clock), the crowd's arrival
    # included; met on the development machine (62, 75 and 96 ms in three runs, 87 ms with a
    # CPU burner beside it) but not on every machine of this kind (202 ms once in
    # CI). Machines of this kind differ up to ~3x in speed, so the test fails at
    # three times the goal: what it guards against is a refusal that waits behind
    # the work (seconds), not the Python proxy's own queueing on two cores. Most of
    # a refusal's time is Serve's proxy hop, not the ingress (its own log: p50 6 ms
    # of the proxy's 20 ms). With Serve's fast path (HAProxy, whose log goes to
    # syslog) the figure is the ingress replica's own. The clients' view (printed)
    # adds the 160-thread load generator sharing the cores.
    assert proxy_503 and p95(proxy_503) < 300, sorted(proxy_503)[-20:]
    assert loaded_rate >= 0.8 * unloaded_rate
    assert health and set(health) == {200}, health
    # Memory stays bounded: the model replica's own memory stays flat (its session
    # runs on one thread), the ingress's grows by the images in flight only (the
    # ~70 the deadline admits), well inside its pixel budget's ~1.2 GB: measured
    # +488, +504 and +522 MiB on one machine (to a peak of ~632 MiB of its own).
    growth = {name: own[p] - own_baseline[p] for p, name in replicas.items()}
    assert growth["Model_u2netp"] <= 100 * 2**20, growth
    assert growth["Ingress"] <= 640 * 2**20, growth
    # And afterwards the service answers as before.
    with service.client() as client:
        assert client.post("/remove", content=next(iter(images.values()))).status_code == 200


def summarize(outcomes: list[Outcome]) -> str:
    return "; ".join(f"{o.status} after {o.seconds:.1f}s: {o.error[:80]}" for o in outcomes[:5])


def noise_png(side: int = 2600) -> bytes:
    """A valid, incompressible PNG of about 19 MiB (side x side RGB noise)."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=0)
    return out.getvalue()


def test_large_uploads_behind_a_busy_model_stay_within_budget(half_speed: Observed) -> None:
    """Serve's proxy reads each request's whole body as soon as it arrives, and the
    ingress replica takes it as soon as a request is assigned to it: what they hold
    is bounded by the admission caps (max_ongoing + max_queued requests of the
    ingress) times the upload size, and by the ingress's pixel budget once decoded.
    Two waves of 40 uploads of 19 MiB at once, queued behind 8 clients keeping the
    model busy, each followed by 10 s idle."""
    service, images = half_speed.service, shared_images()
    big = noise_png()
    replicas = serve_replicas(service.process.pid)
    (ingress,) = [p for p, n in replicas.items() if n == "Ingress"]
    proxy = proxies(service.process.pid)
    watch = [ingress, *proxy]
    settings = deployment_options(serve_config(0), "Ingress")
    held = settings["max_ongoing_requests"] + settings["max_queued_requests"]
    # Private memory leaves out the pages of Ray's object store that the bodies
    # crossed: shared memory, bounded by the store's size, counted once per node.
    baseline = {pid: rss_bytes(pid) for pid in watch}
    own_baseline = {pid: private_bytes(pid) for pid in watch}
    shared_baseline = {pid: shared_bytes(pid) for pid in watch}
    statuses: Counter[int] = Counter()
    peak_growth = dict.fromkeys(watch, 0)
    own_peak = dict.fromkeys(watch, 0)
    shared_peak = dict.fromkeys(watch, 0)
    own_kept: list[dict[int, int]] = []
    own_peaks: list[dict[int, int]] = []
    lines = [f"\n2 x 40 uploads of {len(big) / 2**20:.1f} MiB"]
    for wave in (1, 2):
        with Load(service.url, images, 8):
            time.sleep(5)
            with (
                rss_peaks(watch, 0.05) as peaks,
                rss_peaks(watch, 0.05, private_bytes) as own,
                rss_peaks(watch, 0.05, shared_bytes) as shared,
            ):
                uploads = run_load(service.url, {"noise.png": big}, 40, total=40, timeout_s=300)
        time.sleep(10)  # idle: the ingress gives its freed memory back
        statuses.update(uploads.statuses())
        for pid in watch:
            peak_growth[pid] = max(peak_growth[pid], peaks[pid] - baseline[pid])
            own_peak[pid] = max(own_peak[pid], own[pid] - own_baseline[pid])
            shared_peak[pid] = max(shared_peak[pid], shared[pid] - shared_baseline[pid])
        kept = {pid: rss_bytes(pid) - baseline[pid] for pid in watch}
        own_kept.append({pid: private_bytes(pid) - own_baseline[pid] for pid in watch})
        own_peaks.append({pid: own[pid] - own_baseline[pid] for pid in watch})
        lines.append(f"  wave {wave}: {dict(uploads.statuses())} in {uploads.duration_s:.0f}s")
        for name, pid in (("ingress", ingress), ("proxy", proxy[0])):
            lines.append(
                f"    {name} RSS +{peak_growth[pid] >> 20} MiB at peak"
                f" (private +{own_peak[pid] >> 20}, shared +{shared_peak[pid] >> 20}),"
                f" +{kept[pid] >> 20} MiB after"
                f" (private +{own_kept[-1][pid] >> 20})"
            )
    print("\n".join(lines))
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] > 0, statuses
    # The stated budgets (config/README.md): the proxy holds at most `held` bodies;
    # the ingress at most max_ongoing bodies plus its pixel budget (~12 B a pixel) of
    # its own, and maps the object-store pages of the bodies in flight besides (at
    # most `held` of them: shared memory, counted here once per process that maps it).
    budget = AppSettings.model_validate(serve_config(0)["applications"][0]["args"])
    bodies_budget = held * len(big) * 1.5
    ingress_budget = settings["max_ongoing_requests"] * len(big) + 12 * budget.pixel_budget
    assert all(peak_growth[p] <= bodies_budget for p in proxy), (peak_growth, bodies_budget)
    assert own_peak[ingress] <= ingress_budget, (own_peak, ingress_budget)
    assert shared_peak[ingress] <= bodies_budget, (shared_peak, bodies_budget)
    # And it comes back down: the ingress's own memory to within 150 MiB of where
    # it was after each wave (it trims its C heap when idle). Serve's proxy keeps
    # part of its peak after a wave or not (its allocator's choice; seen both), but
    # after the second it holds no more than it peaked at in the first: the memory
    # is reused, not added to.
    assert all(kept[ingress] <= 150 * 2**20 for kept in own_kept), own_kept
    assert all(own_kept[1][p] <= own_peaks[0][p] + 64 * 2**20 for p in proxy), (
        own_kept,
        own_peaks,
    )
