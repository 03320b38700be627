"""End to end: `serve run serve_config.yaml` as a subprocess, called over HTTP."""

from __future__ import annotations

import concurrent.futures
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, SHARED_IMAGES, Service, assert_parity, gradient, image_bytes
from deployments.bench.harness import rss_peaks, serve_replicas

pytestmark = pytest.mark.e2e

CAR = FIXTURES / "car-1.jpg"


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, str] = response.json()["error"]
    assert error["code"] == code
    # Never a traceback or a server path.
    assert "Traceback" not in error["message"] and "/work" not in error["message"]
    assert ".py" not in error["message"]
    return error


def test_health_and_models(service: Service) -> None:
    with service.client() as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["models"] == {"u2netp": True}
        models = client.get("/models").json()
    assert models["default"] == "u2netp"
    (u2netp,) = models["models"]
    assert u2netp["provider"] == "CPUExecutionProvider" and u2netp["device"] == "cpu"
    assert u2netp["batch_shapes"] == [1, 2, 4] and u2netp["max_batch_size"] == 4


def test_refiners_warm_in_the_background_after_ready(service: Service) -> None:
    """Matting's code loads after the service is ready, and /models says when."""
    with service.client() as client:
        deadline = time.monotonic() + 300  # a fresh environment compiles pymatting first
        refine = client.get("/models").json()["refine"]
        while not refine.get("warm") and "error" not in refine and time.monotonic() < deadline:
            time.sleep(1)
            refine = client.get("/models").json()["refine"]
        assert refine["warm"] is True and refine["warm_s"] > 0, refine
        response = client.post(
            "/remove", params={"alpha_matting": "true"}, content=CAR.read_bytes()
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", SHARED_IMAGES, ids=lambda p: p.name)
def test_rembg_api_matches_rembg(
    service: Service, path: Path, reference_outputs: dict[str, bytes]
) -> None:
    """An unchanged rembg client: multipart `file` and form field `model`."""
    with service.client() as client:
        response = client.post(
            "/api/remove",
            files={"file": (path.name, path.read_bytes())},
            data={"model": "u2netp"},
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert_parity(path.name, response.content, reference_outputs[path.name])


def test_remove_raw_body_with_headers(service: Service) -> None:
    with service.client() as client:
        response = client.post("/remove", content=CAR.read_bytes())
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert (response.headers["x-width"], response.headers["x-height"]) == ("480", "360")
    assert response.headers["x-model"] == "u2netp"
    assert Image.open(io.BytesIO(response.content)).mode == "RGBA"


@pytest.mark.parametrize(
    ("query", "mode", "content_type"),
    [
        ({"only_mask": "true"}, "L", "image/png"),
        ({"format": "webp"}, "RGBA", "image/webp"),
        ({"bgcolor": "255,0,0,255"}, "RGBA", "image/png"),
        ({"post_process_mask": "true", "only_mask": "1"}, "L", "image/png"),
        ({"alpha_matting": "true", "alpha_matting_erode_size": "5"}, "RGBA", "image/png"),
    ],
)
def test_remove_options(
    service: Service, query: dict[str, str], mode: str, content_type: str
) -> None:
    with service.client() as client:
        response = client.post("/remove", params=query, files={"file": CAR.read_bytes()})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    img = Image.open(io.BytesIO(response.content))
    assert img.mode == mode and img.size == (480, 360)
    if "bgcolor" in query:
        assert img.getpixel((0, 0)) == (255, 0, 0, 255)


def test_rembg_api_options(service: Service) -> None:
    with service.client() as client:
        response = client.post(
            "/api/remove",
            params={"bgc": "0,0,255,255"},
            files={"file": ("car.jpg", CAR.read_bytes())},
            data={"om": "false", "ppm": "true"},
        )
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).getpixel((0, 0)) == (0, 0, 255, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "I;16"])
def test_input_modes(service: Service, mode: str) -> None:
    if mode == "I;16":
        img = Image.fromarray(np.asarray(gradient(80, 60, "L")).astype(np.uint16) * 257)
    else:
        img = gradient(80, 60).convert(mode)
    with service.client() as client:
        response = client.post(
            "/remove", content=image_bytes(img, "TIFF" if mode == "CMYK" else "PNG")
        )
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (80, 60)


def test_errors(service: Service) -> None:
    with service.client() as client:
        assert_json_error(client.post("/remove", content=b""), 415, "unsupported_image")
        assert_json_error(
            client.post("/remove", content=b"<html></html>"), 415, "unsupported_image"
        )
        assert_json_error(
            client.post("/remove", content=CAR.read_bytes()[:3000]), 415, "unsupported_image"
        )
        assert_json_error(
            client.post("/remove", params={"format": "gif"}, content=CAR.read_bytes()),
            400,
            "bad_parameter",
        )
        assert_json_error(
            client.post("/api/remove", data={"model": "u2netp"}), 400, "bad_parameter"
        )
        assert_json_error(
            client.post("/api/remove", files={"file": CAR.read_bytes()}, data={"af": "999"}),
            400,
            "bad_parameter",
        )
        error = assert_json_error(
            client.post("/api/remove", files={"file": CAR.read_bytes()}, data={"model": "u2net"}),
            404,
            "unknown_model",
        )
        assert "u2netp" in error["message"]
        assert_json_error(
            client.post("/remove", content=b"\0" * (26 * 1024 * 1024)), 413, "payload_too_large"
        )
        bomb = image_bytes(Image.new("1", (30000, 30000)), "PNG")
        assert_json_error(client.post("/remove", content=bomb), 413, "payload_too_large")
        assert_json_error(client.get("/no/such/route"), 404, "not_found")
        # The service is still up and answers a good request.
        assert client.post("/remove", content=CAR.read_bytes()).status_code == 200


def test_bad_image_never_fails_its_batchmates(service: Service) -> None:
    good, bad = CAR.read_bytes(), b"GIF89a-not-really"

    def call(body: bytes) -> int:
        with service.client() as client:
            return client.post("/remove", content=body).status_code

    bodies = [good, bad] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(call, bodies))
    assert statuses == [200, 415] * 4


def test_parity_holds_inside_concurrent_batches(
    service: Service, reference_outputs: dict[str, bytes]
) -> None:
    """The shared photos sent together (with others) form batches and still equal rembg."""
    with service.client() as client:
        before = client.get("/models").json()["models"][0]["batch_sizes_formed"]

    def call(path: Path) -> tuple[str, bytes]:
        with service.client(timeout=300) as client:
            response = client.post("/api/remove", files={"file": (path.name, path.read_bytes())})
            assert response.status_code == 200, response.text
            return path.name, response.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, SHARED_IMAGES * 2))
    with service.client() as client:
        after = client.get("/models").json()["models"][0]["batch_sizes_formed"]
    formed = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert max(int(k) for k in formed) > 1, f"no batch larger than 1 formed: {formed}"
    for name, body in results:
        assert_parity(name, body, reference_outputs[name])


def test_matting_a_12mp_photo_stays_bounded_and_others_go_on(service: Service) -> None:
    """Alpha matting works on at most `refine.matting_max_pixels` (1 MP by default):
    a 12 MP upload is matted on a downscaled copy, so the ingress's memory grows by
    far less than the ~5 GB full-size matting asks for. Two at once run on the
    refinement thread, one after the other, while a plain request is answered."""
    with Image.open(CAR) as car:
        big = image_bytes(car.convert("RGB").resize((4000, 3000)), "JPEG", quality=90)
    (ingress,) = [p for p, n in serve_replicas(service.process.pid).items() if n == "Ingress"]

    def matting() -> tuple[int, float]:
        with service.client(timeout=300) as client:
            started = time.perf_counter()
            response = client.post("/remove", params={"alpha_matting": "true"}, content=big)
            return response.status_code, time.perf_counter() - started

    with rss_peaks([ingress], 0.05) as peaks, concurrent.futures.ThreadPoolExecutor(2) as pool:
        baseline = dict(peaks)
        matted = [pool.submit(matting) for _ in range(2)]
        time.sleep(1)
        with service.client(timeout=300) as client:
            started = time.perf_counter()
            plain = client.post("/remove", content=CAR.read_bytes())
            plain_s = time.perf_counter() - started
        results = [f.result() for f in matted]
    growth = peaks[ingress] - baseline[ingress]
    print(
        f"\nmatting 12 MP x2: {results}; plain request {plain_s:.1f}s; ingress +{growth >> 20} MiB"
    )
    assert [status for status, _ in results] == [200, 200]
    assert plain.status_code == 200
    # The plain request did not wait for both mattings (they run one after the other).
    assert plain_s < max(seconds for _, seconds in results)
    assert growth < 2 * 2**30, f"the ingress grew by {growth >> 20} MiB"
