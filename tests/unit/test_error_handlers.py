"""Errors outside the image path, on the real HTTP layer over a fake service: answered as
JSON and counted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from conftest import ROOT, gradient, image_bytes
from deployments.api import HttpSettings, build_api
from deployments.errors import ServiceError
from deployments.service import Job, Served


class BrokenService:
    """FAKE service behind the real HTTP layer: its ``remove`` fails with an error
    no stage raises (a bug), the one way to make the real app answer an unexpected
    500 on demand. It records what the app counts."""

    def __init__(self) -> None:
        self.counted_errors: list[ServiceError] = []

    @contextlib.asynccontextmanager
    async def reading(self, refining: bool, model: str | None = None) -> AsyncIterator[None]:
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
