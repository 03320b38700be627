"""Security: API key, CORS, no URL fetching, no paths from requests, no leaks.

One extra service (module scope) runs with both an API key and a CORS origin;
the defaults (no key, CORS off) are checked on the shared session service.
Byte and pixel limits are in test_bad_input.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from test_bad_input import GOOD, assert_json_error, assert_no_leak

from conftest import ROOT, Service, free_port, serve_config
from deployments.bench.harness import start_service, stop_process, write_config

pytestmark = pytest.mark.e2e

KEY = "test-key-0123456789abcdef"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("secured")
    # The key from the environment, as a secret file gives it: with a newline.
    args = {"api_key_env": "REMBG_TEST_API_KEY", "cors_origins": [ORIGIN]}
    path = write_config(tmp, serve_config(free_port(), args=args))
    running = start_service(path, tmp / "serve.log", env={"REMBG_TEST_API_KEY": KEY + "\n"})
    try:
        yield running
    finally:
        stop_process(running.process)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": KEY[:-1] + "X"},  # same length, last byte differs
        {"X-API-Key": KEY + "X"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "wrong", "last-byte", "longer", "basic", "empty-bearer"],
)
def test_api_key_required(secured: Service, headers: dict[str, str]) -> None:
    with secured.client() as client:
        raw = client.post("/remove", content=GOOD, headers=headers)
        rembg = client.post("/api/remove", files={"file": ("a.png", GOOD)}, headers=headers)
    for response in (raw, rembg):
        error = assert_json_error(response, 401, "unauthorized")
        assert KEY not in response.text and KEY not in error["message"]


@pytest.mark.parametrize(
    "headers",
    [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}],
    ids=["x-api-key", "bearer", "bearer-lowercase"],
)
def test_api_key_accepted(secured: Service, headers: dict[str, str]) -> None:
    with secured.client() as client:
        assert client.post("/remove", content=GOOD, headers=headers).status_code == 200
        response = client.post("/api/remove", files={"file": ("a.png", GOOD)}, headers=headers)
        assert response.status_code == 200, response.text


def test_only_health_and_the_page_stay_open(secured: Service) -> None:
    # /models shows pid, replica ids and model files; /openapi.json the whole API.
    with secured.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200
        for path in ("/models", "/openapi.json"):
            assert_json_error(client.get(path), 401, "unauthorized")
            keyed = client.get(path, headers={"X-API-Key": KEY})
            assert keyed.status_code == 200, keyed.text
            assert KEY not in keyed.text


def test_cors_on_when_configured(secured: Service) -> None:
    with secured.client() as client:
        allowed = client.post("/remove", content=GOOD, headers={"Origin": ORIGIN, "X-API-Key": KEY})
        other = client.post(
            "/remove", content=GOOD, headers={"Origin": "https://evil.example", "X-API-Key": KEY}
        )
        preflight = client.options(
            "/remove",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key",
            },
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-width" in allowed.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in other.headers
    # The preflight carries no key and still passes: browsers never send one on it.
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]


def test_default_service_has_no_key_and_no_cors(service: Service) -> None:
    with service.client() as client:
        response = client.post("/remove", content=GOOD, headers={"Origin": ORIGIN})
        preflight = client.options(
            "/remove", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        )
    assert response.status_code == 200
    assert not any(h.startswith("access-control-") for h in response.headers)
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code >= 400 and preflight.status_code != 500
    assert_no_leak(preflight)


class Listener:
    """A TCP socket on 127.0.0.1 that counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()


def test_image_urls_are_never_fetched(service: Service) -> None:
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}/cat.png"
    try:
        with service.client() as client:
            responses = [
                client.get("/api/remove", params={"url": url}),
                client.get("/remove", params={"url": url}),
                client.post("/remove", params={"url": url}),
                client.post("/api/remove", params={"url": url}, data={"url": url}),
                client.post("/api/remove", data={"url": url}, files={"file": ("a.png", GOOD)}),
                client.post("/remove", content=url.encode()),
            ]
        threading.Event().wait(1.0)  # a fetch, if any, would have connected by now
    finally:
        listener.close()
    for response in responses:
        assert 400 <= response.status_code < 500, (response.request.url, response.text)
        assert response.headers["content-type"] == "application/json"
        assert "code" in response.json()["error"]
        assert_no_leak(response)
    assert listener.connections == 0


@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        ({"extras": '{"model_path": "/etc/passwd"}'}, 400, "bad_parameter"),
        ({"extras": "{}"}, 400, "bad_parameter"),
        ({"model": "/etc/passwd"}, 404, "unknown_model"),
        ({"model": "u2netp.onnx"}, 404, "unknown_model"),
        ({"model": "../assets/u2netp"}, 404, "unknown_model"),
        ({"model": "U2NETP"}, 404, "unknown_model"),
        ({"model_path": "/etc/passwd"}, 400, "bad_parameter"),
    ],
)
def test_no_server_path_from_a_request(
    service: Service, form: dict[str, str], status: int, code: str
) -> None:
    """Models are matched by exact name against the configured list, never opened by path."""
    with service.client() as client:
        response = client.post("/api/remove", data=form, files={"file": ("a.png", GOOD)})
    error = assert_json_error(response, status, code)
    # The caller's own input may be echoed; a server path never is.
    assert str(ROOT) not in error["message"] and "site-packages" not in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no/such/route", 404),
        ("PUT", "/remove", 405),
        ("DELETE", "/api/remove", 405),
        ("GET", "/../../etc/passwd", 404),
        ("GET", "/static/..%2f..%2fdeployments%2fsettings", 404),
    ],
)
def test_route_errors_are_json_without_leaks(
    service: Service, method: str, path: str, status: int
) -> None:
    with service.client() as client:
        response = client.request(method, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert_no_leak(response)


def test_server_header_has_no_version(service: Service) -> None:
    with service.client() as client:
        for response in (
            client.get("/healthz"),
            client.post("/remove", content=GOOD),
            client.post("/remove", content=b"x"),
        ):
            assert_no_leak(response)
