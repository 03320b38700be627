"""The Grafana dashboard queries only metrics that exist and imports as Grafana JSON."""

from __future__ import annotations

import ast
import json
import re

from conftest import ROOT

DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
METRICS_MODULE = ROOT / "deployments" / "metrics.py"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


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
