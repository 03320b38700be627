"""Metrics: what Ray exports after real requests (the dashboard's queries and the error
handlers without a service: tests/unit/test_dashboard.py, test_error_handlers.py).

The live test runs `serve run` on serve_config.yaml (JSON logs, a free port) in
its own Ray temp dir, finds the node's metrics endpoint the way Prometheus does
(Ray's service-discovery file in the session dir) and scrapes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import Service, free_port, gradient, image_bytes, service_with_own_ray
from deployments.bench.harness import serve_config


@dataclass
class Observed:
    """A running service and where its Ray session keeps metrics and logs."""

    service: Service
    session_dir: Path

    def metrics_urls(self) -> list[str]:
        # Ray lists every metrics endpoint of the node here for Prometheus'
        # file-based discovery; the targets name the node's IP, and we only
        # ever talk to 127.0.0.1, so keep their ports.
        discovery = self.session_dir / "prom_metrics_service_discovery.json"
        targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
        return [f"http://127.0.0.1:{t.rsplit(':', 1)[1]}/metrics" for t in targets]

    def scrape(self) -> str:
        texts = []
        for url in self.metrics_urls():
            # An endpoint still starting is skipped: the next poll has it.
            with contextlib.suppress(httpx.HTTPError):
                texts.append(httpx.get(url, timeout=10).text)
        return "\n".join(texts)


@contextmanager
def observed_service(encoding: str = "JSON") -> Iterator[Observed]:
    """`serve run` on serve_config.yaml with ``logging_config.encoding`` set, with
    its own Ray temp dir (``service_with_own_ray``)."""
    config = serve_config(
        free_port(),
        top={"logging_config": {"encoding": encoding}},
        # The model replica's per-batch line is DEBUG: test_logs reads it.
        # (A deployment's logging_config replaces the top level's: encoding again.)
        deployments={
            "Model_u2netp": {"logging_config": {"encoding": encoding, "log_level": "DEBUG"}}
        },
    )
    env = {
        # Export every second instead of every ten, so the scrape sees requests soon.
        "RAY_metrics_report_interval_ms": "1000",
        # Ray's agent keeps a gauge for two export intervals (2 s here) and the
        # controller sets the replica-health gauge only every 10 s when it does not
        # change: it was in a scrape 2 s out of 10. Set on every control loop instead.
        "RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S": "0",
    }
    with service_with_own_ray(config, env) as service:
        yield Observed(service, (service.log.parent / "ray" / "session_latest").resolve())


_SHARED: list[tuple[Observed, ExitStack]] = []


@pytest.fixture(scope="module")
def observed(request: pytest.FixtureRequest) -> Iterator[Observed]:
    """One JSON-logging service for the modules that use it (this one, test_logs):
    started by the first, stopped as soon as no test left in the session needs it."""
    if not _SHARED:
        stack = ExitStack()
        _SHARED.append((stack.enter_context(observed_service()), stack))
    yield _SHARED[0][0]
    items = request.session.items
    mine = [i for i, item in enumerate(items) if getattr(item, "module", None) is request.module]
    later = items[max(mine) + 1 :] if mine else []
    if not any("observed" in item.fixturenames for item in later):
        _SHARED.pop()[1].close()


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )


APP = ("application", "rembg")


def test_metrics_are_exported(observed: Observed) -> None:
    with observed.service.client() as client:
        for i in range(4):
            assert client.post("/remove", content=image_bytes(gradient(40 + i, 30))).is_success
        assert client.post("/remove", content=b"not an image").status_code == 415
        assert (
            client.post(
                "/remove", params={"model": "nope"}, content=image_bytes(gradient())
            ).status_code
            == 404
        )
        # Errors raised outside the image path are counted too, in the handlers.
        assert client.post("/remove", params={"af": "1"}, content=b"x").status_code == 400
        assert client.get("/no/such/route").status_code == 404
        wide = image_bytes(Image.new("L", (16384, 2)))
        assert client.post("/remove", params={"format": "webp"}, content=wide).status_code == 413

    wanted = {
        ("ray_rembg_images_total", (("model", "u2netp"),)): 4,
        ("ray_rembg_errors_total", (("code", "unsupported_image"), ("model", "u2netp"))): 1,
        # An unknown model is counted under "-": request values never become labels.
        ("ray_rembg_errors_total", (("code", "unknown_model"), ("model", "-"))): 1,
        ("ray_rembg_errors_total", (("code", "bad_parameter"), ("model", "-"))): 1,
        ("ray_rembg_errors_total", (("code", "not_found"), ("model", "-"))): 1,
        ("ray_rembg_errors_total", (("code", "payload_too_large"), ("model", "u2netp"))): 1,
        ("ray_rembg_batch_size_count", (("model", "u2netp"),)): 1,
        ("ray_rembg_inference_seconds_count", (("model", "u2netp"),)): 1,
        ("ray_rembg_queue_wait_seconds_count", (("model", "u2netp"),)): 4,
        ("ray_rembg_preprocess_seconds_count", (("model", "u2netp"),)): 4,
        ("ray_rembg_response_bytes_count", (("model", "u2netp"),)): 4,
        # Serve's own HTTP metrics: on its default path labelled by route (/remove),
        # with HAProxy in front (the fast path) by the app's route prefix (/).
        ("ray_serve_num_http_requests_total", (APP, ("status_code", "200"))): 4,
        ("ray_serve_num_http_requests_total", (APP, ("status_code", "415"))): 1,
        ("ray_serve_http_request_latency_ms_count", (APP,)): 8,
        ("ray_serve_deployment_replica_healthy", (("deployment", "Model_u2netp"),)): 1,
    }
    deadline = time.monotonic() + 120
    missing: dict[str, float] = {}
    while time.monotonic() < deadline:
        samples = _samples(observed.scrape())
        missing = {}
        for (name, labels), least in wanted.items():
            got = _total(samples, name, **dict(labels))
            if got < least:
                missing[f"{name}{dict(labels)}"] = got
        if not missing:
            break
        time.sleep(2)
    assert not missing, f"not exported (or below the count sent): {missing}"
    # Every series of ours carries the app and deployment: the dashboard filters on them.
    ours = [s for s in samples if s[0].startswith("ray_rembg_")]
    assert all(labels.get("application") == "rembg" for _, labels, _ in ours)
    assert {labels.get("deployment") for _, labels, _ in ours} == {"Ingress", "Model_u2netp"}
    assert os.path.isdir(observed.session_dir / "logs" / "serve")
