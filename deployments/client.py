"""A Python client for the service, on httpx: ``Client`` (sync) and ``AsyncClient``.

    with Client("http://127.0.0.1:8000") as client:
        cut = client.remove(Path("car.jpg"), Options(alpha_matting=True))
        Path("car.png").write_bytes(cut.data)

Errors the service answers come back as ``ApiError`` (HTTP status + the stable
code of its JSON body). A 503 (overloaded, or a replica restarting) and
timeouts or refused connections are retried with exponential backoff, honouring
``Retry-After``; everything else is raised at once. ``health()`` and ``models()``
return the service's own typed records (``deployments.reports``). Imports
neither Ray nor the pipeline (only httpx and the options' and reports' pydantic
models), so it is light enough for any caller.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from pydantic import ValidationError

from deployments.options import RemoveQuery
from deployments.reports import HealthReport, ModelsReport

# ``POST /remove``'s query options, from the service's own contract.
Options = RemoveQuery

DEFAULT_URL = "http://127.0.0.1:8000"

# Worth another try: the service shed load or is moving a replica, or the
# network dropped us. 4xx answers will not change on a retry.
_RETRY_STATUS = 503
_RETRY_ERRORS = (httpx.TimeoutException, httpx.ConnectError, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class Result:
    """A cut-out (or mask) and what the service said about it."""

    data: bytes
    media_type: str
    width: int
    height: int
    model: str


# ``GET /healthz``'s answer: ``ok``, and per model whether it can serve.
Health = HealthReport

T = TypeVar("T")


class ApiError(Exception):
    """A non-2xx answer: ``status``, the JSON error's ``code`` and ``message``."""

    def __init__(
        self, status: int, code: str, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Retry:
    """How often and how long to wait: ``base_s * 2**attempt`` with jitter, capped."""

    attempts: int = 4
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_s)
        # Full jitter: clients that failed together do not come back together.
        return float(random.uniform(0, min(self.max_s, self.base_s * 2**attempt)))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_from(response: httpx.Response) -> ApiError:
    """The service's ``{"error": {"code", "message"}}``; a plain status where absent."""
    code, message = "http_error", response.reason_phrase or "error"
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = str(body["error"].get("code", code))
            message = str(body["error"].get("message", message))
    except ValueError:
        if response.text:
            message = response.text[:200]
    return ApiError(response.status_code, code, message, _retry_after(response))


def _result(response: httpx.Response) -> Result:
    if response.status_code != 200:
        raise error_from(response)
    return Result(
        data=response.content,
        media_type=response.headers.get("content-type", ""),
        width=int(response.headers.get("x-width", 0)),
        height=int(response.headers.get("x-height", 0)),
        model=response.headers.get("x-model", ""),
    )


def _health_body(response: httpx.Response) -> HealthReport | None:
    try:
        return HealthReport.model_validate_json(response.content)
    except ValidationError:
        return None


def _health(response: httpx.Response) -> HealthReport:
    # 503 from /healthz with its body is an answer (a model cannot serve), not an error.
    body = _health_body(response) if response.status_code in (200, 503) else None
    if body is None:
        raise error_from(response)
    return body


def _is_health_answer(response: httpx.Response) -> bool:
    """A 503 that is /healthz's answer, final; not Serve's or the network's refusal."""
    return _health_body(response) is not None


def _never(response: httpx.Response) -> bool:
    return False


def _models(response: httpx.Response) -> ModelsReport:
    if response.status_code != 200:
        raise error_from(response)
    return ModelsReport.model_validate_json(response.content)


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request to send (with retries) and how its final answer is read."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    options: dict[str, Any] = field(default_factory=dict)
    # Whether a 503 is this route's own answer, read as such rather than retried.
    answers_503: Callable[[httpx.Response], bool] = _never


def _remove(data: bytes, options: Options | None) -> _Call[Result]:
    return _Call(
        "POST",
        "/remove",
        _result,
        {
            "content": data,
            "params": (options or Options()).query_params(),
            "headers": {"Content-Type": "application/octet-stream"},
        },
    )


_HEALTH = _Call("GET", "/healthz", _health, answers_503=_is_health_answer)
_MODELS = _Call("GET", "/models", _models)


def _wait(
    retry: Retry, attempt: int, call: _Call[Any], response: httpx.Response | None
) -> float | None:
    """Seconds to wait before sending ``call`` again after ``attempt`` (from 0), or
    None when this outcome is final. ``response`` is None when the request failed
    on the network (one of ``_RETRY_ERRORS``)."""
    if attempt + 1 >= retry.attempts:
        return None
    if response is None:
        return retry.delay(attempt, None)
    if response.status_code != _RETRY_STATUS or call.answers_503(response):
        return None
    return retry.delay(attempt, _retry_after(response))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def _body(image: bytes | Path) -> bytes:
    return image.read_bytes() if isinstance(image, Path) else image


def _http_options(url: str, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    return {"base_url": url, "headers": _headers(api_key), "timeout": timeout_s}


class Client:
    """Blocking client; one connection pool, use it as a context manager."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: Retry = Retry(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry
        self._http = httpx.Client(**_http_options(url, api_key, timeout_s), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **call.options)
            except _RETRY_ERRORS:
                if (wait := _wait(self.retry, attempt, call, None)) is None:
                    raise
            else:
                if (wait := _wait(self.retry, attempt, call, response)) is None:
                    return call.read(response)
            time.sleep(wait)
            attempt += 1

    def remove(self, image: bytes | Path, options: Options | None = None) -> Result:
        """The image (bytes or a file) without its background."""
        return self._call(_remove(_body(image), options))

    def health(self) -> HealthReport:
        return self._call(_HEALTH)

    def models(self) -> ModelsReport:
        return self._call(_MODELS)


class AsyncClient:
    """The same on asyncio; share one across tasks to reuse connections."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retry: Retry = Retry(),
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry
        self._http = httpx.AsyncClient(
            **_http_options(url, api_key, timeout_s),
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, **call.options)
            except _RETRY_ERRORS:
                if (wait := _wait(self.retry, attempt, call, None)) is None:
                    raise
            else:
                if (wait := _wait(self.retry, attempt, call, response)) is None:
                    return call.read(response)
            await asyncio.sleep(wait)
            attempt += 1

    async def remove(self, image: bytes | Path, options: Options | None = None) -> Result:
        """The image (bytes or a file) without its background."""
        # Reading a file is quick next to the round trip; keep it off the loop anyway.
        data = await asyncio.to_thread(_body, image) if isinstance(image, Path) else image
        return await self._call(_remove(data, options))

    async def health(self) -> HealthReport:
        return await self._call(_HEALTH)

    async def models(self) -> ModelsReport:
        return await self._call(_MODELS)
