"""Admission by cost, without Serve: admitted once the body is read, a read deadline,
refinements (matting, decontamination) admitted by their own queue, and a cancelled
request's budget and place held until its thread's work ends."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from starlette.requests import Request
from starlette.types import Message

from conftest import gradient, image_bytes
from deployments import service
from deployments.admission import Admission, PixelBudget, when_done
from deployments.errors import Overloaded, RequestTimeout
from deployments.options import CutoutOptions
from deployments.pipeline import Finished
from deployments.service import Job, Remover, RemoverConfig
from deployments.settings import AppSettings
from deployments.wire import read_body

DATA = image_bytes(gradient(400, 300), "PNG")
PLAIN = CutoutOptions()
MATTING = CutoutOptions(alpha_matting=True)


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_check_refuses_without_counting_and_reading_counts_against_the_cap_only() -> None:
    admission = Admission(deadline_s=10, initial_rate=1.0, max_in_flight=3)
    admission.check()
    assert admission.in_flight == 0
    # Two slow senders reading their bodies: no work, so the deadline is untouched...
    admission.reading = 2
    assert admission.expected_s() == 1.0
    admission.admit()
    # ...but they hold places under the cap: a fourth is refused.
    with pytest.raises(Overloaded, match="3 requests in progress"):
        admission.check()


def test_a_rate_can_be_measured_before_its_window_is_full() -> None:
    admission = Admission(deadline_s=30, initial_rate=0.1, window=4, measured_after=2)
    admission.admit()
    admission.release(completed=True)
    assert admission.rate() == 0.1  # one completion: no interval yet
    admission.admit()
    time.sleep(0.1)
    admission.release(completed=True)
    assert 5 <= admission.rate() <= 11, admission.rate()


def test_when_done_waits_for_every_future_and_runs_once() -> None:
    calls: list[str] = []
    done: Future[None] = Future()
    done.set_result(None)
    when_done([done], lambda: calls.append("now"))
    assert calls == ["now"]
    first: Future[None] = Future()
    second: Future[None] = Future()
    when_done([done, first, second], lambda: calls.append("later"))
    first.set_result(None)
    assert calls == ["now"]
    second.set_result(None)
    assert calls == ["now", "later"]


def test_a_cancelled_holder_keeps_its_room_until_its_thread_ends() -> None:
    async def scenario() -> None:
        budget = PixelBudget(100)
        leave = threading.Event()
        running: list[Future[Any]] = []
        with ThreadPoolExecutor(1) as pool:

            async def holder() -> None:
                async with budget.hold(80, running):
                    future = pool.submit(leave.wait, 5)
                    running.append(future)
                    await asyncio.wrap_future(future)

            task = asyncio.ensure_future(holder())
            await _until(lambda: budget.free == 20)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert budget.free == 20  # the thread still works on its pixels
            leave.set()
            await _until(lambda: budget.free == 100)

    asyncio.run(scenario())


class ZeroMask:
    """FAKE model: an empty mask at once (the admission is under test, not the model)."""

    async def __call__(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        await asyncio.sleep(0)
        return np.zeros((320, 320), dtype=np.uint8)


@pytest.fixture
def gated_finish(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, threading.Event]]:
    """``finish`` made slow on demand: a refining one waits for ``refine`` to be set,
    a plain one runs at once. FAKE stage: the real one's seconds are what the slow
    tests measure."""
    gates = {"refine": threading.Event(), "started": threading.Event()}

    def finish(image: Any, mask: Any, options: CutoutOptions, *rest: Any) -> Finished:
        if options.alpha_matting or options.decontaminate:
            gates["started"].set()
            gates["refine"].wait(10)
        return Finished(b"png", image.width, image.height)

    monkeypatch.setattr(service, "finish", finish)
    yield gates
    gates["refine"].set()


def _remover(**settings: Any) -> Remover:
    config = RemoverConfig.of(AppSettings(**settings))
    return Remover(config, {"u2netp": ZeroMask()}, threads=2)


def test_refinements_queue_apart_and_wait_for_their_turn_without_pixels(
    gated_finish: dict[str, threading.Event],
) -> None:
    async def scenario() -> None:
        remover = _remover(deadline_s=30)
        try:
            # Until measured, a refinement takes 10 s: three fit in the 30 s deadline.
            mattings = [asyncio.ensure_future(remover.serve(Job(DATA, None, MATTING)))]
            await _until(gated_finish["started"].is_set)
            mattings += [
                asyncio.ensure_future(remover.serve(Job(DATA, None, MATTING))) for _ in range(2)
            ]
            await asyncio.sleep(0.1)
            assert remover.refine_admission.in_flight == 3
            # The two waiting for their turn hold no pixels: only the running one.
            assert remover.budget.capacity - remover.budget.free == 400 * 300
            with pytest.raises(Overloaded, match="refinements") as refused:
                await remover.serve(Job(DATA, None, MATTING))
            assert int(refused.value.headers["Retry-After"]) >= 1
            with pytest.raises(Overloaded):  # refused before its body is read
                async with remover.reading(refining=True):
                    pass
            # Plain requests are not behind them: admitted and served at once.
            async with remover.reading(refining=False):
                assert remover.admission.reading == 1
            plain = await asyncio.wait_for(remover.serve(Job(DATA, None, PLAIN)), 5)
            assert (plain.width, plain.height) == (400, 300)
            assert remover.admission.in_flight == 0
            gated_finish["refine"].set()
            await asyncio.wait_for(asyncio.gather(*mattings), 10)
            assert remover.refine_admission.in_flight == 0
            assert remover.budget.free == remover.budget.capacity
        finally:
            remover.close()

    asyncio.run(scenario())


def test_a_cancelled_request_keeps_its_place_and_pixels_until_its_stage_ends(
    gated_finish: dict[str, threading.Event],
) -> None:
    async def scenario() -> None:
        remover = _remover()
        try:
            task = asyncio.ensure_future(remover.serve(Job(DATA, None, MATTING)))
            await _until(gated_finish["started"].is_set)
            task.cancel()  # the client left while its matting runs on its thread
            with pytest.raises(asyncio.CancelledError):
                await task
            assert remover.refine_admission.in_flight == 1
            assert remover.budget.capacity - remover.budget.free == 400 * 300
            assert remover.busy()
            gated_finish["refine"].set()
            await _until(lambda: not remover.busy())
            assert remover.budget.free == remover.budget.capacity
            assert remover.refine_turns.free == 1
        finally:
            remover.close()

    asyncio.run(scenario())


def test_a_body_not_received_within_the_read_deadline_gets_408() -> None:
    sent = [b"\xff", b"\xd8"]

    async def trickle() -> Message:
        if sent:
            await asyncio.sleep(0.05)
            return {"type": "http.request", "body": sent.pop(0), "more_body": True}
        await asyncio.sleep(10)  # a client that stopped sending
        return {"type": "http.request", "body": b"", "more_body": False}

    async def read(timeout_s: float) -> bytes:
        scope = {"type": "http", "method": "POST", "headers": [], "query_string": b""}
        return await read_body(Request(scope, trickle), 1000, timeout_s)

    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"0\.3s") as timed_out:
        asyncio.run(read(0.3))
    assert timed_out.value.status == 408
    assert time.monotonic() - started < 2
