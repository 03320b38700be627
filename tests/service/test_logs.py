"""Structured logs: with ``logging_config.encoding: JSON`` every replica log line is
JSON, and a request's lines carry its request id, model, sizes and stage timings.

The service is test_metrics' (`serve run` on serve_config.yaml, encoding switched
to JSON, in its own Ray temp dir): the replica logs are found at
<temp>/ray/session_latest/logs/serve/.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_metrics import Observed, observed  # noqa: F401 (the shared service)

from conftest import gradient, image_bytes

pytestmark = pytest.mark.e2e


def _records(files: list[Path]) -> list[dict[str, Any]]:
    records = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pytest.fail(f"{path.name}:{number} is not JSON: {line[:200]}")
    return records


def _wait_for(logs: Path, pattern: str, found: Any, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Records of the replica logs matching ``pattern`` once ``found(records)`` holds."""
    deadline = time.monotonic() + timeout_s
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        records = _records(sorted(logs.glob(pattern)))
        if found(records):
            break
        time.sleep(1)
    return records


def _access_ids(records: list[dict[str, Any]]) -> set[Any]:
    """Request ids of Serve's access lines for ``POST /remove``."""
    return {r.get("request_id") for r in records if "POST /remove" in r.get("message", "")}


def test_replica_logs_are_json_with_request_fields(observed: Observed) -> None:  # noqa: F811
    ids = [f"test-{uuid.uuid4()}" for _ in range(3)]
    sizes = [(40, 30), (64, 48), (96, 20)]
    with observed.service.client() as client:
        for request_id, (w, h) in zip(ids, sizes, strict=True):
            response = client.post(
                "/remove",
                content=image_bytes(gradient(w, h)),
                # Serve takes the caller's X-Request-ID and answers with it.
                headers={"X-Request-ID": request_id},
            )
            assert response.status_code == 200
            assert response.headers["x-request-id"] == request_id
        bad = client.post("/remove", content=b"nope", headers={"X-Request-ID": "test-bad"})
        assert bad.status_code == 415

    logs = observed.session_dir / "logs" / "serve"
    ingress = _wait_for(
        logs,
        "replica_*_Ingress_*.log",
        lambda rs: (
            {r.get("request_id") for r in rs if r.get("message") == "image done"} >= set(ids)
            # Serve writes its access line after the response: wait for it too.
            and _access_ids(rs) >= set(ids) | {"test-bad"}
        ),
    )
    done = {r["request_id"]: r for r in ingress if r.get("message") == "image done"}
    for request_id, (w, h) in zip(ids, sizes, strict=True):
        record = done[request_id]
        assert record["model"] == "u2netp"
        assert (record["width"], record["height"]) == (w, h)
        assert record["bytes_in"] > 0 and record["bytes_out"] > 0
        timings = record["timings_ms"]
        assert set(timings) == {"pre", "model", "post"}
        assert all(isinstance(v, int | float) and v >= 0 for v in timings.values())
        assert record["route"] == "/remove" and record["application"] == "rembg"
        assert record["levelname"] == "INFO" and record["deployment"] == "rembg_Ingress"
    # Serve's access log line for each request carries the same id.
    assert set(ids) | {"test-bad"} <= _access_ids(ingress)
    # The console of `serve run` has the access line a request, not "image done"
    # (Ray forwards the replicas' console lines a little later than the files').
    deadline = time.monotonic() + 30
    while True:
        console = [ln for ln in observed.service.log.read_text().splitlines() if ids[0] in ln]
        if any("POST /remove 200" in ln for ln in console) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any("POST /remove 200" in ln for ln in console), console
    assert not any("image done" in ln for ln in console), console

    model = _wait_for(
        logs,
        "replica_*_Model_*.log",
        lambda rs: sum(r.get("batch_size", 0) for r in rs if r.get("message") == "batch done") >= 3,
    )
    batches = [r for r in model if r.get("message") == "batch done"]
    assert sum(r["batch_size"] for r in batches) >= 3
    assert all(r["model"] == "u2netp" and r["inference_ms"] > 0 for r in batches)
    assert all(r["deployment"] == "rembg_Model_u2netp" for r in batches)
    # DEBUG, shown here because this service's model deployment logs at DEBUG.
    assert all(r["levelname"] == "DEBUG" for r in batches)
    # No Serve access line for the ingress's calls (serve_config.yaml turns it off).
    calls = [r["message"] for r in model if r.get("message", "").startswith("CALL ")]
    assert not calls, calls[:3]
