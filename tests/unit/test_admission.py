"""The replica's gates without Serve: the model's "free for the next batch" gate, the
pixel budget shared by threads and the event loop, the idle memory trim, and the
refiners' compile child."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.admission import ModelFree, PixelBudget
from deployments.memory import IdleTrimmer
from deployments.refine import compile_refiners_aside


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_model_free_holds_arrivals_until_the_batch_ends_then_lets_them_in_together() -> None:
    async def scenario() -> None:
        gate = ModelFree()
        entered: list[str] = []

        async def arrival(name: str) -> None:
            await gate.wait()
            entered.append(name)

        assert gate.is_set()
        await asyncio.wait_for(arrival("idle"), 1)  # free: in at once
        with gate.batch():
            assert not gate.is_set()
            waiting = [asyncio.create_task(arrival(name)) for name in ("a", "b")]
            await asyncio.sleep(0.05)
            assert entered == ["idle"]  # the batch runs: they wait
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        assert entered == ["idle", "a", "b"]
        assert gate.is_set()

    asyncio.run(scenario())


def test_model_free_opens_when_a_batch_fails() -> None:
    gate = ModelFree()
    with pytest.raises(RuntimeError, match="session"), gate.batch():
        raise RuntimeError("session run failed")
    assert gate.is_set()


def test_pixel_budget_threads_are_first_come_first_served() -> None:
    budget = PixelBudget(100)
    order: list[str] = []

    def job(name: str, pixels: int) -> None:
        with budget.hold_sync(pixels):
            order.append(f"{name} in (free {budget.free})")
            assert budget.free >= 0
            time.sleep(0.05)

    def queued(n: int) -> None:
        deadline = time.monotonic() + 5
        while len(budget._waiters) < n:
            assert time.monotonic() < deadline
            time.sleep(0.005)

    with budget.hold_sync(60):
        big = threading.Thread(target=job, args=("big", 1000))  # waits for all of it
        big.start()
        queued(1)
        small = threading.Thread(target=job, args=("small", 10))  # fits, but after big
        small.start()
        queued(2)
        assert order == []
    big.join(5)
    small.join(5)
    assert order == ["big in (free 0)", "small in (free 90)"]
    assert budget.free == 100


def test_pixel_budget_a_thread_releasing_wakes_a_waiter_on_the_event_loop() -> None:
    budget = PixelBudget(100)
    held, leave = threading.Event(), threading.Event()

    def worker() -> None:
        with budget.hold_sync(80):
            held.set()
            leave.wait(5)

    async def scenario() -> int:
        thread = threading.Thread(target=worker)
        thread.start()
        assert await asyncio.to_thread(held.wait, 5)
        hold = budget.hold(50)  # referenced: collected, it would give its room back
        entering = asyncio.ensure_future(hold.__aenter__())
        await asyncio.sleep(0.05)
        assert not entering.done()  # 80 + 50 would not fit
        leave.set()
        await asyncio.wait_for(entering, 5)
        free = budget.free
        await hold.__aexit__(None, None, None)
        thread.join(5)
        return free

    assert asyncio.run(scenario()) == 50


def test_idle_trimmer_gives_memory_back_at_most_once_per_period_and_only_when_idle() -> None:
    calls: list[float] = []
    state = {"idle": True}

    class Counted(IdleTrimmer):
        def give_back(self) -> None:
            calls.append(time.monotonic())
            super().give_back()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            trimmer = Counted(lambda: state["idle"], pool, every_s=0.3)
            for _ in range(3):  # a burst: one now, one once the period has passed
                trimmer.went_idle()
            await _until(lambda: len(calls) == 1)
            await _until(lambda: len(calls) == 2)
            assert calls[1] - calls[0] >= 0.29
            trimmer.went_idle()  # within the period: deferred...
            state["idle"] = False  # ...and busy again when it comes: no trim
            await asyncio.sleep(0.6)
            assert len(calls) == 2

    asyncio.run(scenario())


def test_the_refiners_compile_in_a_child_that_pauses_while_busy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real child (``python -m deployments.refine``): paused while busy, then
    run on once its patience is spent; it exits cleanly."""
    busy_asked: list[float] = []

    def busy() -> bool:
        busy_asked.append(time.monotonic())
        return True

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        started = time.monotonic()
        asyncio.run(compile_refiners_aside(busy, patience_s=0.5, timeout_s=300))
    assert time.monotonic() - started >= 0.5  # it was held for its patience
    assert len(busy_asked) > 1
    assert "compile process failed" not in caplog.text, caplog.text
