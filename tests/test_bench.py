"""The benchmark runs end to end in quick mode and reports every section.

Speed targets are not asserted here: the benchmark reports them (PASS/FAIL) and a
shared, noisy 2-core machine would make any such assertion flaky.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deployments import bench

pytestmark = pytest.mark.bench


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_quick_bench_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--skip-peer", "--out", str(out)]) == 0
    results = json.loads(out.read_text())

    limit = results["model_limit"]
    assert set(limit["images_per_s_by_batch"]) == {"1", "2", "4", "8"}
    assert all(positive(v) for v in limit["images_per_s_by_batch"].values())
    assert limit["best_batch"] in (1, 2, 4, 8) and positive(limit["images_per_s"])

    pipe = results["pipeline"]
    assert set(pipe["latency_ms_by_image"]) == {p.name for p in bench.FIXTURES.glob("*-1.jpg")}
    assert all(positive(v) for v in pipe["latency_ms_by_image"].values())
    assert positive(pipe["images_per_s"])

    service = results["service"]
    assert positive(service["ready_s"])
    assert service["first_request"]["status"] == 200
    assert positive(service["first_request"]["latency_ms"])
    assert set(service["phases"]) == {"c1", "c16", "c64"}
    for name, phase in service["phases"].items():
        assert phase["statuses"] == {"200": phase["requests"]}, name
        assert positive(phase["images_per_s"]), name
        lat = phase["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], name
        # Requests reached the model in batches (one replica's count: with more
        # replicas, /models answers from one of them).
        formed = phase["batch_sizes_formed"]
        assert 0 < sum(int(k) * v for k, v in formed.items()) <= phase["requests"], name
    assert service["replicas"], "no Serve replica process found"
    for name in ("12mp", "24mp"):
        big = service["large"][name]
        assert big["status"] == 200 and positive(big["response_bytes"]), name
        assert positive(big["memory"]["peak_rss_bytes_total"]), name
    assert service["parity"]["ok"], service["parity"]

    names = {t["name"] for t in results["targets"]}
    assert "served c16 / model limit" in names and "parity with rembg" in names
    assert all(t["result"] in ("PASS", "FAIL", "SKIP") for t in results["targets"])
    assert "peer" not in results
