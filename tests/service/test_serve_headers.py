"""Serve's client-set headers cannot make work unexpiring or uncancellable.

Serve's proxy honours ``x-request-timeout-seconds: 0`` (no timeout) and
``x-request-disconnect-disabled: ?1`` (work runs on after the client leaves) from
any client, before the app sees the request. The app bounds its own work
(``work_timeout_s``: 408) and watches for the client leaving itself. One
`serve run` with ``work_timeout_s`` short enough that a 12 MP matting passes it.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from test_bad_input import assert_json_error

from conftest import (
    FIXTURES,
    Service,
    free_port,
    image_bytes,
    load_image,
    serve_config,
    service_with_own_ray,
)

pytestmark = pytest.mark.e2e

WORK_S = 1.0
MATTING = "/remove?alpha_matting=true"


@pytest.fixture(scope="module")
def bounded() -> Iterator[Service]:
    """The service, with its own Ray temp dir (``_log_lines`` reads its replicas' log
    files there)."""
    config = serve_config(free_port(), args={"work_timeout_s": WORK_S, "refine_warmup": "off"})
    with service_with_own_ray(config) as running:
        yield running


@pytest.fixture(scope="module")
def big() -> bytes:
    car = load_image(FIXTURES / "car-1.jpg").convert("RGB")
    return image_bytes(car.resize((4000, 3000)), "JPEG", quality=90)  # 12 MP


def _log_lines(service: Service, request_id: str, timeout_s: float = 20) -> list[str]:
    """The lines for ``request_id`` of the service's console and of its ingress
    replicas' log files (where "image done" goes), once its access line is in."""
    logs = service.log.parent / "ray" / "session_latest" / "logs" / "serve"
    end = time.monotonic() + timeout_s
    while True:
        files = sorted(logs.glob("replica_*_Ingress_*.log"))
        console = [ln for ln in service.log.read_text().splitlines() if request_id in ln]
        in_files = [ln for f in files for ln in f.read_text().splitlines() if request_id in ln]
        # The access line is in the ingress's file too: found there, the file
        # that "image done" would be in was read.
        if any("POST /remove" in ln for ln in in_files) or time.monotonic() > end:
            assert files, f"no ingress replica log under {logs}"
            return console + in_files
        time.sleep(0.2)


def test_no_timeout_header_does_not_lift_the_apps_deadline(bounded: Service, big: bytes) -> None:
    request_id = str(uuid.uuid4())
    headers = {"x-request-timeout-seconds": "0", "X-Request-ID": request_id}
    with bounded.client() as client:
        started = time.monotonic()
        response = client.post(MATTING, content=big, headers=headers)
        took = time.monotonic() - started
    assert_json_error(response, 408, "request_timeout")
    assert took < WORK_S + 10, took
    assert not any("image done" in ln for ln in _log_lines(bounded, request_id))


def test_a_client_that_leaves_has_its_work_stopped_despite_the_header(
    bounded: Service, big: bytes
) -> None:
    request_id = str(uuid.uuid4())
    url = urlsplit(bounded.url)
    head = (
        f"POST {MATTING} HTTP/1.1\r\nHost: {url.hostname}\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(big)}\r\n"
        f"X-Request-ID: {request_id}\r\nx-request-disconnect-disabled: ?1\r\n"
        # Serve's own timeout off too: only the app's watch can stop it now.
        "x-request-timeout-seconds: 0\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port or 80)) as sock:
        sock.sendall(head.encode() + big)
        time.sleep(0.3)  # the body is in; the work has begun
    lines = _log_lines(bounded, request_id)
    assert any("client left: work cancelled" in ln for ln in lines), lines
    assert not any("image done" in ln for ln in lines), lines
