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


def test_ztxt_bombs_cost_what_plain_pngs_cost(service: Service) -> None:
    """8 PNGs of 66 KB whose zTXt chunks inflate to 63 MiB each (Pillow alone held
    ~0.5 GB for them, and inflated each twice, ~0.65 s a time) against 8 plain 1x1
    PNGs: the text is skipped unread, so both take the same time and memory."""
    png = image_bytes(Image.new("RGB", (1, 1)), "PNG")
    bomb = with_chunks(png, *[ztxt(b"Comment", b"a" * (1 << 20))] * 63)
    (ingress,) = [p for p, n in serve_replicas(service.process.pid).items() if n == "Ingress"]

    def burst(body: bytes) -> tuple[list[int], float, int]:
        with rss_peaks([ingress], 0.02) as peaks, concurrent.futures.ThreadPoolExecutor(8) as pool:
            baseline = dict(peaks)
            started = time.perf_counter()
            answers = list(pool.map(lambda _: timed_post(service, body), range(8)))
            elapsed = time.perf_counter() - started
        return [r.status_code for r, _ in answers], elapsed, peaks[ingress] - baseline[ingress]

    timed_post(service, png)  # warm
    plain_status, plain_s, plain_growth = burst(png)
    bomb_status, bomb_s, bomb_growth = burst(bomb)
    print(f"\nplain: {plain_s:.2f}s +{plain_growth >> 20} MiB", end="; ")
    print(f"zTXt: {bomb_s:.2f}s +{bomb_growth >> 20} MiB")
    assert plain_status == bomb_status == [200] * 8
    assert bomb_s < 2 * plain_s + 1.0
    assert bomb_growth < plain_growth + 64 * 2**20, f"the ingress grew by {bomb_growth >> 20} MiB"
