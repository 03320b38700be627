"""The app's own bounds on a request's work (``deployments.api.bounded``): a
deadline, and the client leaving; Serve's headers can lift Serve's own."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref

import pytest
from starlette.requests import Request
from starlette.types import Message

from deployments.api import bounded
from deployments.errors import ClientClosed, RequestTimeout


def _request(leaves_after_s: float | None) -> Request:
    """A request whose body is read; its client disconnects after ``leaves_after_s``."""

    async def receive() -> Message:
        if leaves_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(leaves_after_s or 0)
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


class Work:
    def __init__(self, takes_s: float) -> None:
        self.takes_s, self.cancelled = takes_s, False

    async def __call__(self) -> str:
        try:
            await asyncio.sleep(self.takes_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "done"


def test_work_that_ends_in_time_answers() -> None:
    work = Work(0.01)
    assert asyncio.run(bounded(_request(None), work(), 5)) == "done"


def test_work_past_the_deadline_is_stopped() -> None:
    work = Work(10)
    with pytest.raises(RequestTimeout, match=r"within 0\.1s"):
        asyncio.run(bounded(_request(None), work(), 0.1))
    assert work.cancelled


def test_a_client_that_leaves_stops_its_work() -> None:
    work = Work(10)
    with pytest.raises(ClientClosed):
        asyncio.run(bounded(_request(0.05), work(), None))
    assert work.cancelled


def test_what_the_work_sets_in_context_stays_visible() -> None:
    # The error metric's model tag is set during the work and read by the
    # error handler afterwards, in the same request task.
    routed: contextvars.ContextVar[str] = contextvars.ContextVar("routed", default="-")

    async def work() -> None:
        routed.set("u2netp")
        raise ValueError("undecodable")

    async def scenario() -> str:
        with pytest.raises(ValueError):
            await bounded(_request(None), work(), 5)
        return routed.get()

    assert asyncio.run(scenario()) == "u2netp"


def test_cancelled_from_outside_stops_the_work_too() -> None:
    work = Work(10)

    async def scenario() -> None:
        task = asyncio.ensure_future(bounded(_request(None), work(), None))
        await asyncio.sleep(0.05)
        task.cancel()  # Serve cancels the request (the client left, no header)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert work.cancelled


class Held:
    """Stands for what a request's frames hold (a decoded image)."""


@pytest.mark.parametrize("how", ["client left", "cancelled from outside"])
def test_a_stopped_request_holds_nothing_once_its_task_is_gone(how: str) -> None:
    # A cancelled task keeps its CancelledError, whose traceback holds the frames
    # it passed through, ``bounded``'s among them: were the task reachable from
    # there, that would be a cycle, and what the request's frames hold would live
    # until a full garbage collection (in the ingress: decoded images, past the
    # pixel budget). So it must go by reference counting alone.
    held: list[weakref.ref[Held]] = []

    async def work() -> None:
        image = Held()
        held.append(weakref.ref(image))
        await asyncio.sleep(10)

    async def scenario() -> None:
        leaves = 0.05 if how == "client left" else None
        task = asyncio.ensure_future(bounded(_request(leaves), work(), 60))
        await asyncio.sleep(0.1)
        if how == "cancelled from outside":
            task.cancel()
        # Not awaited: that would drop the CancelledError the task keeps (Serve
        # does not await it either).
        await asyncio.wait([task])
        await asyncio.sleep(0)  # the watcher ends
        if how == "client left":
            assert isinstance(task.exception(), ClientClosed)
        else:
            assert task.cancelled()
        del task

    gc.disable()
    try:
        asyncio.run(scenario())
        alive = [ref() is not None for ref in held]
    finally:
        gc.enable()
    assert alive == [False], "kept alive by a reference cycle"
