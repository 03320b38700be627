"""/healthz's view of Serve's status: one shared call, bounded, never cancelled
by a probe that leaves (``deployments.ingress.SharedCall``; no Ray started)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.ingress import SharedCall


class Slow:
    """A blocking call that returns once released, counting its calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        assert self.release.wait(10)
        return f"status {self.calls}"


def test_a_probe_that_leaves_does_not_fail_the_others() -> None:
    async def scenario() -> None:
        slow = Slow()
        shared = SharedCall(slow, max_age_s=60, timeout_s=5)
        leaving, staying = (asyncio.ensure_future(shared.get()) for _ in range(2))
        await asyncio.sleep(0.05)
        leaving.cancel()  # its client disconnected
        await asyncio.sleep(0.05)
        slow.release.set()
        assert await staying == "status 1"
        assert leaving.cancelled()
        assert await shared.get() == "status 1"  # cached: no second call
        assert slow.calls == 1

    asyncio.run(scenario())


def test_a_hung_call_times_out_and_is_not_repeated() -> None:
    async def scenario() -> None:
        slow = Slow()
        shared = SharedCall(slow, max_age_s=60, timeout_s=0.1)
        with pytest.raises(TimeoutError):
            await shared.get()
        with pytest.raises(TimeoutError):  # still the one call, not a second thread
            await shared.get()
        slow.release.set()
        await asyncio.sleep(0.1)
        assert await shared.get() == "status 1"
        assert slow.calls == 1

    asyncio.run(scenario())


def test_a_failed_call_is_not_cached() -> None:
    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("controller away")
        return len(calls)

    async def scenario() -> None:
        shared = SharedCall(flaky, max_age_s=60, timeout_s=5)
        with pytest.raises(ConnectionError):
            await shared.get()
        assert await shared.get() == 2

    asyncio.run(scenario())
