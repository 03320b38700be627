"""The Python client without a service: its options and its retry policy on httpx's
MockTransport (tests/service/test_client_service.py has it against a service)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from pydantic import ValidationError

from conftest import FIXTURES
from deployments.client import ApiError, AsyncClient, Client, Options, Retry
from deployments.reports import wire

CAR = FIXTURES / "car-1.jpg"


def test_options_send_only_what_differs() -> None:
    assert Options().query_params() == {}
    options = Options(model="u2netp", only_mask=True, bgcolor="#ff0000", format="webp")
    assert options.query_params() == {
        "model": "u2netp",
        "only_mask": "true",
        "bgcolor": "255,0,0,255",
        "format": "webp",
    }
    assert Options(alpha_matting_erode_size=3).query_params() == {"alpha_matting_erode_size": "3"}


def test_options_are_checked_before_sending() -> None:
    with pytest.raises(ValidationError, match="bgcolor"):
        Options(bgcolor="red")


# The retry policy needs a service that sheds load or drops connections on cue:
# httpx's MockTransport plays it, in front of the real client code.


def _flaky(failures: list[httpx.Response | Exception]) -> httpx.MockTransport:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if failures:
            failure = failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        return httpx.Response(
            200,
            content=b"PNG",
            headers={"X-Width": "2", "X-Height": "1", "X-Model": "m", "Content-Type": "image/png"},
        )

    transport = httpx.MockTransport(handler)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


def _overloaded(retry_after: str = "0") -> httpx.Response:
    return httpx.Response(
        503,
        json={"error": {"code": "overloaded", "message": "at capacity"}},
        headers={"Retry-After": retry_after},
    )


def test_retries_503_and_network_errors_then_succeeds() -> None:
    transport = _flaky([_overloaded(), httpx.ConnectError("refused"), _overloaded()])
    with Client("http://svc", transport=transport, retry=Retry(attempts=4, base_s=0.01)) as c:
        result = c.remove(b"img")
    assert (result.data, result.width, result.height, result.model) == (b"PNG", 2, 1, "m")
    assert len(transport.seen) == 4  # type: ignore[attr-defined]


def test_gives_up_after_the_attempts_with_the_last_error() -> None:
    transport = _flaky([_overloaded() for _ in range(5)])
    retry = Retry(attempts=3)
    with (
        Client("http://svc", transport=transport, retry=retry) as c,
        pytest.raises(ApiError) as raised,
    ):
        c.remove(b"img")
    assert (raised.value.status, raised.value.code, raised.value.retry_after_s) == (
        503,
        "overloaded",
        0.0,
    )
    assert len(transport.seen) == 3  # type: ignore[attr-defined]


def test_client_errors_are_not_retried() -> None:
    bad = httpx.Response(400, json={"error": {"code": "bad_parameter", "message": "no"}})
    transport = _flaky([bad])
    with Client("http://svc", transport=transport) as c, pytest.raises(ApiError, match="400"):
        c.remove(b"img")
    assert len(transport.seen) == 1  # type: ignore[attr-defined]


def test_async_retries_timeouts() -> None:
    failures: list[httpx.Response | Exception] = [httpx.ReadTimeout("slow"), _overloaded()]
    seen: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if failures:
            failure = failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        return httpx.Response(200, content=b"ok", headers={"X-Width": "1", "X-Height": "1"})

    async def run() -> bytes:
        async with AsyncClient(
            "http://svc", transport=httpx.MockTransport(handler), retry=Retry(base_s=0.01)
        ) as client:
            return (await client.remove(b"img")).data

    assert asyncio.run(run()) == b"ok" and len(seen) == 3


def _answers(answers: list[httpx.Response | Exception]) -> httpx.MockTransport:
    """A transport that plays ``answers`` in order and records what was asked."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    transport = httpx.MockTransport(handler)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


MODELS_BODY = {
    "default": "u2netp",
    "models": [
        {"name": "u2netp", "ready": True, "provider": "CPUExecutionProvider", "device": "cpu"},
        {"name": "isnet", "ready": False, "reason": "TimeoutError"},
    ],
    "refine": {"warm": False, "warming": True},
}


def test_health_and_models_retry_like_remove() -> None:
    """Refused connections and Serve's own 503 (no health body) are retried; the
    typed records come back."""
    down = {"status": "unavailable", "models": {"u2netp": False}}
    transport = _answers(
        [
            httpx.ConnectError("refused"),
            _overloaded(),
            httpx.Response(503, json=down),
            _overloaded(),
            httpx.Response(200, json=MODELS_BODY),
        ]
    )
    with Client("http://svc", transport=transport, retry=Retry(attempts=4, base_s=0.01)) as c:
        health = c.health()
        models = c.models()
    assert transport.seen == ["/healthz"] * 3 + ["/models"] * 2  # type: ignore[attr-defined]
    assert (health.ok, health.models) == (False, {"u2netp": False})
    assert models.default == "u2netp" and models.refine.warming
    ready, down_model = models.models
    assert (ready.provider, ready.stale) == ("CPUExecutionProvider", False)
    assert (down_model.ready, down_model.reason, down_model.file) == (False, "TimeoutError", None)


POOL_BODY = {
    "models": ["pool-a", "pool-b"],
    "replica": {
        "replica": "Pool#x1",
        "pid": 42,
        "budget_bytes": 1_500_000_000,
        "used_bytes": 600_000_000,
        "loaded": ["pool-a"],
        "models": [
            {"name": "pool-a", "loaded": True, "bytes": 600_000_000, "loads": 2, "hits": 5},
            {"name": "pool-b", "loaded": False, "evictions": 1, "failures": 1, "error": "OSError"},
        ],
    },
}


def test_models_carry_the_pool_typed_and_as_sent() -> None:
    body = {**MODELS_BODY, "pool": POOL_BODY}
    transport = _answers([httpx.Response(200, json=body), httpx.Response(200, json=MODELS_BODY)])
    with Client("http://svc", transport=transport) as c:
        models = c.models()
        without = c.models()
    assert models.pool is not None and models.pool.replica is not None
    assert models.pool.models == ["pool-a", "pool-b"]
    a, b = models.pool.replica.models
    assert (a.name, a.loaded, a.bytes, a.hits, a.leases) == ("pool-a", True, 600_000_000, 5, 0)
    assert (b.loaded, b.bytes, b.failures, b.error) == (False, None, 1, "OSError")
    # The wire contract: the record gives back what /models sent, key for key.
    assert wire(models) == body
    assert without.pool is None and "pool" not in wire(without)


def test_a_healthz_503_is_an_answer_not_retried() -> None:
    down = httpx.Response(503, json={"status": "unavailable", "models": {"u2netp": False}})
    transport = _answers([down])

    async def run() -> bool:
        async with AsyncClient("http://svc", transport=transport, retry=Retry(base_s=0.01)) as c:
            return (await c.health()).ok

    assert asyncio.run(run()) is False
    assert transport.seen == ["/healthz"]  # type: ignore[attr-defined]


def test_health_gives_up_with_the_last_refusal() -> None:
    transport = _answers([_overloaded() for _ in range(3)])
    with (
        Client("http://svc", transport=transport, retry=Retry(attempts=3, base_s=0.01)) as c,
        pytest.raises(ApiError) as raised,
    ):
        c.health()
    assert (raised.value.status, raised.value.code) == (503, "overloaded")
    assert len(transport.seen) == 3  # type: ignore[attr-defined]


def test_backoff_honours_retry_after_and_grows() -> None:
    retry = Retry(base_s=0.5, max_s=30)
    assert retry.delay(0, 2.0) == 2.0
    assert retry.delay(0, 120.0) == 30  # capped
    assert all(0 <= retry.delay(3, None) <= 4.0 for _ in range(50))
    assert max(retry.delay(6, None) for _ in range(200)) > 4.0
