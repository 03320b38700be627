"""Cheap uploads that used to cost minutes or memory, through the real server.

A progressive JPEG whose last scan is repeated thousands of times (decoding costs
scans x pixels) and a small PNG of zTXt chunks that inflate to ~63 MiB: each is
answered at once, and a normal request sent beside them in normal time.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from PIL import Image

from conftest import FIXTURES, Service, image_bytes, progressive_jpeg, with_chunks, ztxt
from deployments.bench.harness import rss_peaks, serve_replicas

pytestmark = pytest.mark.e2e

CAR = FIXTURES / "car-1.jpg"


def timed_post(service: Service, body: bytes) -> tuple[httpx.Response, float]:
    with service.client(timeout=120) as client:
        started = time.perf_counter()
        response = client.post("/remove", content=body)
        return response, time.perf_counter() - started


def test_scan_bombs_are_refused_at_once_and_others_go_on(service: Service) -> None:
    """Before: two 45k-scan bombs held the ingress for minutes and a car beside them
    got a 408 at 60 s. Now each bomb is a 415 from its header walk, in well under 1 s."""
    bomb = progressive_jpeg(2000, extra_scans=3000)  # ~7 s of decoding each, before
    timed_post(service, CAR.read_bytes())  # warm
    _, idle_s = timed_post(service, CAR.read_bytes())
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bombs = [pool.submit(timed_post, service, bomb) for _ in range(2)]
        car = pool.submit(timed_post, service, CAR.read_bytes())
        (car_response, car_s), answers = car.result(), [b.result() for b in bombs]
    for response, seconds in answers:
        assert response.status_code == 415, response.text
        assert response.json()["error"]["code"] == "unsupported_image"
        assert "scans" in response.json()["error"]["message"]
        assert seconds < 1.0
    assert car_response.status_code == 200
    assert car_s < max(2.0, 5 * idle_s), f"car: {car_s:.2f}s beside the bombs, {idle_s:.2f}s idle"


def test_ztxt_bombs_are_answered_at_once_without_their_text(service: Service) -> None:
    """20 PNGs of 66 KB whose zTXt chunks inflate to 63 MiB each: Pillow alone held
    ~1.2 GB for them. The text is skipped unread: the ingress grows by little."""
    png = image_bytes(Image.new("RGB", (1, 1)), "PNG")
    bomb = with_chunks(png, *[ztxt(b"Comment", b"a" * (1 << 20))] * 63)
    (ingress,) = [p for p, n in serve_replicas(service.process.pid).items() if n == "Ingress"]
    timed_post(service, bomb)  # the first request's own allocations are not the bomb's
    with rss_peaks([ingress], 0.02) as peaks, concurrent.futures.ThreadPoolExecutor(20) as pool:
        baseline = dict(peaks)
        answers = list(pool.map(lambda _: timed_post(service, bomb), range(20)))
    growth = peaks[ingress] - baseline[ingress]
    assert [r.status_code for r, _ in answers] == [200] * 20
    assert max(seconds for _, seconds in answers) < 5.0
    assert growth < 200 * 2**20, f"the ingress grew by {growth >> 20} MiB"
