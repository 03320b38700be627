"""A Python client for the service, on httpx: ``Client`` (sync) and ``AsyncClient``.

    with Client("http://127.0.0.1:8000") as client:
        cut = client.remove(Path("car.jpg"), Options(alpha_matting=True))
        Path("car.png").write_bytes(cut.data)

Errors the service answers come back as ``ApiError`` (HTTP status + the stable
code of its JSON body). A 503 (overloaded, or a replica restarting) and
timeouts or refused connections are retried with exponential backoff, honouring
``Retry-After``; everything else is raised at once. Imports neither Ray nor the
pipeline (only httpx and the options' pydantic models), so it is light enough
for any caller.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from deployments.options import RemoveQuery

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


@dataclass(frozen=True)
class Health:
    ok: bool
    models: dict[str, bool]


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


def _health(response: httpx.Response) -> Health:
    # 503 from /healthz is an answer (a model is not warm), not an error.
    if response.status_code not in (200, 503):
        raise error_from(response)
    body: dict[str, Any] = response.json()
    return Health(ok=response.status_code == 200, models=dict(body.get("models", {})))


def _models(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise error_from(response)
    body: dict[str, Any] = response.json()
    return body


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def _body(image: bytes | Path) -> bytes:
    return image.read_bytes() if isinstance(image, Path) else image


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
        self._http = httpx.Client(
            base_url=url, headers=_headers(api_key), timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except _RETRY_ERRORS:
                if attempt + 1 >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay(attempt, None))
            else:
                if response.status_code != _RETRY_STATUS or attempt + 1 >= self.retry.attempts:
                    return response
                time.sleep(self.retry.delay(attempt, _retry_after(response)))
            attempt += 1

    def remove(self, image: bytes | Path, options: Options | None = None) -> Result:
        """The image (bytes or a file) without its background."""
        return _result(
            self._send(
                "POST",
                "/remove",
                content=_body(image),
                params=(options or Options()).query_params(),
                headers={"Content-Type": "application/octet-stream"},
            )
        )

    def health(self) -> Health:
        return _health(self._http.get("/healthz"))

    def models(self) -> dict[str, Any]:
        return _models(self._http.get("/models"))


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
            base_url=url,
            headers=_headers(api_key),
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except _RETRY_ERRORS:
                if attempt + 1 >= self.retry.attempts:
                    raise
                await asyncio.sleep(self.retry.delay(attempt, None))
            else:
                if response.status_code != _RETRY_STATUS or attempt + 1 >= self.retry.attempts:
                    return response
                await asyncio.sleep(self.retry.delay(attempt, _retry_after(response)))
            attempt += 1

    async def remove(self, image: bytes | Path, options: Options | None = None) -> Result:
        """The image (bytes or a file) without its background."""
        # Reading a file is quick next to the round trip; keep it off the loop anyway.
        data = await asyncio.to_thread(_body, image) if isinstance(image, Path) else image
        return _result(
            await self._send(
                "POST",
                "/remove",
                content=data,
                params=(options or Options()).query_params(),
                headers={"Content-Type": "application/octet-stream"},
            )
        )

    async def health(self) -> Health:
        return _health(await self._http.get("/healthz"))

    async def models(self) -> dict[str, Any]:
        return _models(await self._http.get("/models"))
