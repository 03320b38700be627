"""Metrics: what Ray exports after real requests, and the Grafana dashboard's queries.

The live test runs `serve run` on serve_config.yaml (JSON logs, a free port) in
its own Ray temp dir, finds the node's metrics endpoint the way Prometheus does
(Ray's service-discovery file in the session dir) and scrapes it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Service, free_port, gradient, image_bytes
from deployments.api import HttpSettings, build_api
from deployments.bench.harness import serve_config, start_service, stop_process, write_config
from deployments.errors import ServiceError
from deployments.service import Job, Served

DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
METRICS_MODULE = ROOT / "deployments" / "metrics.py"

# Serve's built-in metrics the dashboard may use: Ray 2.60's "Serve metrics"
# documentation, each also seen on a live scrape of this service.
SERVE_METRICS = {
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms",
    "ray_serve_deployment_processing_latency_ms",
    "ray_serve_deployment_request_counter_total",
    "ray_serve_deployment_error_counter_total",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_replica_starts_total",
    "ray_serve_replica_processing_queries",
    "ray_serve_deployment_queued_queries",
    "ray_serve_num_ongoing_http_requests",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_autoscaling_desired_replicas",
    "ray_serve_num_router_requests_total",
    "ray_serve_batch_wait_time_ms",
    "ray_serve_batch_execution_time_ms",
    "ray_serve_actual_batch_size",
    "ray_serve_batch_queue_length",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


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
    """`serve run` on serve_config.yaml with ``logging_config.encoding`` set, in its
    own Ray temp dir (RAY_TMPDIR; short, as Ray's socket paths must stay < 108 bytes)."""
    temp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    config = serve_config(free_port(), top={"logging_config": {"encoding": encoding}})
    path = write_config(temp, config)
    env = {
        "RAY_TMPDIR": str(temp),
        # Export every second instead of every ten, so the scrape sees requests soon.
        "RAY_metrics_report_interval_ms": "1000",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        service = start_service(path, temp / "serve.log", timeout_s=300)
    try:
        yield Observed(service, (temp / "ray" / "session_latest").resolve())
    finally:
        stop_process(service.process)
        shutil.rmtree(temp, ignore_errors=True)


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


def our_metrics() -> dict[str, str]:
    """Name -> kind of every metric deployments/metrics.py creates, read from its source."""
    found = {}
    for node in ast.walk(ast.parse(METRICS_MODULE.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("Counter", "Histogram", "Gauge")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found[str(node.args[0].value)] = node.func.id
    return found


def exported_names() -> set[str]:
    """Every series name Prometheus can hold for our metrics and the Serve ones."""
    names = set()
    for name, kind in our_metrics().items():
        base = "ray_" + name
        names |= {base + s for s in HISTOGRAM_SUFFIXES} if kind == "Histogram" else {base}
    for name in SERVE_METRICS:
        names |= (
            {name} if name.endswith("_total") else {name, *(name + s for s in HISTOGRAM_SUFFIXES)}
        )
    return names


def _panels() -> list[dict[str, object]]:
    panels: list[dict[str, object]] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


def test_dashboard_queries_name_only_known_metrics() -> None:
    known = exported_names()
    used = set()
    for panel in _panels():
        targets = panel["targets"]
        assert isinstance(targets, list) and targets, f"panel {panel['title']} has no query"
        for target in targets:
            names = set(re.findall(r"\bray_[a-z0-9_]+", target["expr"]))
            assert names, f"{panel['title']}: {target['expr']} names no metric"
            unknown = names - known
            assert not unknown, f"{panel['title']}: unknown metric(s) {sorted(unknown)}"
            used |= names
    # Every metric we define is on the dashboard, and Serve's latency and replicas too.
    for name in our_metrics():
        assert any(u.startswith("ray_" + name) for u in used), f"{name} is on no panel"
    for needed in (
        "ray_serve_http_request_latency_ms_bucket",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_num_http_requests_total",
    ):
        assert needed in used


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids))
    titles = " ".join(str(p["title"]).lower() for p in _panels())
    for topic in (
        "requests per second",
        "error",
        "latency",
        "batch size",
        "queue wait",
        "inference",
        "pre / post",
        "bytes",
        "replicas",
    ):
        assert topic in titles, topic
    # The Prometheus data source is a variable, so the import asks for it.
    assert dashboard["templating"]["list"][0]["type"] == "datasource"


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
        ("ray_serve_num_http_requests_total", (("route", "/remove"), ("status_code", "200"))): 4,
        ("ray_serve_num_http_requests_total", (("route", "/remove"), ("status_code", "415"))): 1,
        ("ray_serve_http_request_latency_ms_count", (("route", "/remove"),)): 8,
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


class BrokenService:
    """FAKE service behind the real HTTP layer: its ``remove`` fails with an error
    no stage raises (a bug), the one way to make the real app answer an unexpected
    500 on demand. It records what the app counts."""

    def __init__(self) -> None:
        self.counted_errors: list[ServiceError] = []

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        yield

    async def remove(self, job: Job) -> Served:
        raise RuntimeError(f"a bug, with a path: {ROOT}")

    async def health(self) -> dict[str, bool]:
        return {"u2netp": True}

    async def models(self) -> dict[str, Any]:
        return {}

    def counted(self, error: ServiceError) -> None:
        self.counted_errors.append(error)


def test_errors_outside_the_image_path_are_counted_in_the_handlers() -> None:
    """401 (no key), 413 (body over the limit) and an unexpected 500 are answered
    as JSON, without a traceback or a path, and each reaches the error metric."""
    service = BrokenService()
    api = build_api(service, HttpSettings(max_upload_bytes=1000, api_key="secret"))
    key = {"X-API-Key": "secret"}

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://rembg") as client:
            return [
                await client.post("/remove", content=b"x"),
                await client.post("/remove", content=b"x" * 1001, headers=key),
                await client.post("/remove", content=image_bytes(gradient()), headers=key),
            ]

    answers = asyncio.run(send())
    assert [a.status_code for a in answers] == [401, 413, 500]
    assert [a.json()["error"]["code"] for a in answers] == [
        "unauthorized",
        "payload_too_large",
        "internal_error",
    ]
    assert all("Traceback" not in a.text and str(ROOT) not in a.text for a in answers)
    assert [e.status for e in service.counted_errors] == [401, 413, 500]
