"""What one ingress replica takes on, no Serve: deadline admission, the pixel budget,
the refinement thread, and refusals up front."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Collection
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from conftest import gradient, image_bytes
from deployments import service
from deployments.admission import Admission, PixelBudget, images_in_flight
from deployments.compose import warm_refine
from deployments.errors import Overloaded, PayloadTooLarge
from deployments.models import spec_for
from deployments.options import CutoutOptions
from deployments.service import Job, Remover, RemoverConfig
from deployments.settings import AppSettings


def test_admission_refuses_what_would_miss_the_deadline() -> None:
    admission = Admission(deadline_s=10, initial_rate=1.0)  # one image a second
    for _ in range(10):
        admission.admit()  # the 10th would finish in 10 s: still in time
    with pytest.raises(Overloaded) as refused:
        admission.admit()
    # Retry-After: the time the ten in flight need to drain.
    assert refused.value.headers == {"Retry-After": "10"}
    admission.release(completed=True)
    admission.admit()  # room again
    assert admission.in_flight == 10


def test_admission_keeps_places_free_under_its_cap() -> None:
    # The deadline would take 100; the cap (Serve's max_ongoing_requests less the
    # places kept for /healthz) takes 3.
    admission = Admission(deadline_s=100, initial_rate=1.0, max_in_flight=3)
    for _ in range(3):
        admission.admit()
    with pytest.raises(Overloaded) as refused:
        admission.admit()
    assert "3 requests in progress" in refused.value.message
    assert refused.value.headers == {"Retry-After": "3"}
    admission.release(completed=True)
    admission.admit()


def test_image_requests_leave_places_for_health_only_where_there_are_places_to_spare() -> None:
    assert images_in_flight(48) == 44  # serve_config.yaml's ingress
    assert images_in_flight(16) == 12
    assert images_in_flight(5) == 5  # Serve's default: no place to spare
    assert images_in_flight(1) == 1


def test_admission_always_takes_one_when_idle() -> None:
    admission = Admission(deadline_s=1, initial_rate=0.01)  # a very slow estimate
    admission.admit()
    with pytest.raises(Overloaded):
        admission.admit()


def test_admission_measures_its_rate_over_busy_time_only() -> None:
    admission = Admission(deadline_s=30, initial_rate=1.0, window=4)
    # Four completions, 0.05 s apart while busy; long idle gaps between them
    # do not count against the rate.
    for _ in range(4):
        admission.admit()
        time.sleep(0.05)
        admission.release(completed=True)
        time.sleep(0.1)
    assert 15 <= admission.rate() <= 25, admission.rate()


def test_lanes_judge_by_their_own_rate_and_share_the_places() -> None:
    fast = Admission(deadline_s=10, initial_rate=10.0, max_in_flight=6)
    slow = fast.lane(initial_rate=0.1)  # a pool loading models: 10 s an image
    slow.admit()
    with pytest.raises(Overloaded, match="over the 10s deadline"):
        slow.admit()  # the second would finish in 20 s at this lane's rate
    for _ in range(5):
        fast.admit()  # the slow lane's backlog is not the fast lane's
    with pytest.raises(Overloaded, match="6 requests in progress"):
        fast.admit()  # but both hold the replica's places
    slow.release(completed=True)
    fast.admit()
    assert fast.places.taken() == 6 and fast.max_in_flight == slow.max_in_flight == 6


def test_a_full_replica_asks_to_retry_when_every_lane_has_drained() -> None:
    idle = Admission(deadline_s=30, initial_rate=10.0, max_in_flight=4)
    busy = idle.lane(initial_rate=0.5)  # 4 in flight at 2 s each: 8 s to drain
    for _ in range(4):
        busy.admit()
    with pytest.raises(Overloaded, match="4 requests in progress") as refused:
        idle.check()
    assert refused.value.retry_after_s == 8


def test_a_pooled_models_requests_do_not_slow_a_dedicated_ones() -> None:
    async def scenario() -> None:
        config = RemoverConfig.of(AppSettings(deadline_s=10))
        models = {"u2netp": ZeroMask(), "pooled": ZeroMask()}
        remover = Remover(
            config,
            models,
            threads=2,
            specs={"pooled": spec_for("u2netp")},
            lazy=frozenset({"pooled"}),
        )
        try:
            await remover.warm_up()
            dedicated, pooled = remover.lane("u2netp", False), remover.lane("pooled", False)
            assert dedicated is remover.admission and pooled is not dedicated
            assert remover.lane(None, False) is dedicated  # the default model's
            assert remover.lane("pooled", True) is remover.refine_admission
            # The pooled lane measured a pool that loads: one image every 10 s.
            pooled.initial_rate = 0.1
            pooled.admit()
            with pytest.raises(Overloaded):
                async with remover.reading(refining=False, model="pooled"):
                    pass
            async with remover.reading(refining=False, model="u2netp"):
                pass
            # A model named in the body (rembg's form): read unless no lane takes it.
            pooled.release(completed=False)
            dedicated.initial_rate = 0.1
            dedicated.admit()
            async with remover.reading(refining=False):
                pass
            with pytest.raises(Overloaded):
                async with remover.reading(refining=False, model="u2netp"):
                    pass
            pooled.admit()
            with pytest.raises(Overloaded):
                async with remover.reading(refining=False):
                    pass
            pooled.release(completed=False)
            dedicated.release(completed=False)
            dedicated.initial_rate = 10.0
            served = await remover.serve(Job(image_bytes(gradient(64, 48)), None, CutoutOptions()))
            assert (served.width, served.height) == (64, 48)
        finally:
            remover.close()

    asyncio.run(scenario())


def test_pixel_budget_is_first_come_first_served() -> None:
    async def scenario() -> list[str]:
        budget = PixelBudget(100)
        order: list[str] = []

        async def job(name: str, pixels: int, hold_s: float) -> None:
            async with budget.hold(pixels):
                order.append(f"{name} in (free {budget.free})")
                assert budget.free >= 0
                await asyncio.sleep(hold_s)

        await asyncio.gather(
            job("a", 60, 0.05),
            job("big", 1000, 0.01),  # more than the whole budget: waits for all of it
            job("small", 10, 0.0),  # fits now, but comes after big: waits its turn
        )
        assert budget.free == 100
        return order

    assert asyncio.run(scenario()) == ["a in (free 40)", "big in (free 0)", "small in (free 90)"]


def test_pixel_budget_gives_back_what_a_cancelled_waiter_held() -> None:
    async def scenario() -> int:
        budget = PixelBudget(100)
        async with budget.hold(80):
            waiter = asyncio.ensure_future(budget.hold(50).__aenter__())
            await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        return budget.free

    assert asyncio.run(scenario()) == 100


class ZeroMask:
    """FAKE model: answers an empty mask at once, so that the budget, not the
    model, is what these tests see (the real model is in test_model_server)."""

    def __init__(self) -> None:
        self.concurrent = self.most = 0

    async def __call__(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        self.concurrent += 1
        self.most = max(self.most, self.concurrent)
        await asyncio.sleep(0.05)
        self.concurrent -= 1
        return np.zeros((320, 320), dtype=np.uint8)


def test_decoded_images_stay_within_the_pixel_budget() -> None:
    # 4 MP images, a budget of two of them: never more than two held at once, and
    # the others wait (undecoded) rather than fail.
    settings = AppSettings(pixel_budget=8_000_000, limits={"max_pixels": 4_000_000})
    data = image_bytes(gradient(2000, 2000), "PNG")
    held: list[int] = []
    waiting: list[int] = []

    class Watched(PixelBudget):
        @asynccontextmanager
        async def hold(
            self, pixels: int, running: Collection[Future[Any]] = ()
        ) -> AsyncIterator[None]:
            waiting.append(len(self._waiters) + (pixels > self.free))
            async with super().hold(pixels, running):
                held.append(self.capacity - self.free)
                yield

    async def scenario() -> None:
        remover = Remover(RemoverConfig.of(settings), {"u2netp": ZeroMask()}, threads=2)
        remover.budget = Watched(settings.pixel_budget)
        try:
            jobs = [remover.remove(Job(data, None, CutoutOptions())) for _ in range(5)]
            served = await asyncio.gather(*jobs)
        finally:
            remover.close()
        assert all((s.width, s.height) == (2000, 2000) for s in served)

    asyncio.run(scenario())
    assert len(held) == 5 and max(held) <= 8_000_000, held
    assert max(waiting) >= 1, waiting


def test_webp_over_its_side_limit_is_refused_before_decoding() -> None:
    model = ZeroMask()
    wide = image_bytes(Image.new("L", (16384, 2)), "PNG")

    async def scenario() -> None:
        remover = Remover(RemoverConfig.of(AppSettings()), {"u2netp": model}, threads=1)
        try:
            with pytest.raises(PayloadTooLarge, match="16383"):
                await remover.remove(Job(wide, None, CutoutOptions(), "webp"))
        finally:
            remover.close()

    asyncio.run(scenario())
    assert model.most == 0  # the model was never asked


def test_refiners_warm_on_their_own_pool_and_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    ran_on: list[str] = []

    def recorded() -> None:
        ran_on.append(threading.current_thread().name)
        warm_refine()  # the real one: imports rembg.bg and runs each refiner

    monkeypatch.setattr(service, "warm_refine", recorded)

    async def scenario() -> tuple[dict[str, object], dict[str, object]]:
        remover = Remover(RemoverConfig.of(AppSettings()), {"u2netp": ZeroMask()}, threads=1)
        try:
            before = dict(remover.refine_state)
            await remover.warm_refine()
        finally:
            remover.close()
        return before, remover.refine_state

    before, after = asyncio.run(scenario())
    assert before == {"warm": False}
    assert after["warm"] is True and isinstance(after["warm_s"], float), after
    # On the refine pool: a matting request that comes meanwhile queues behind it.
    assert len(ran_on) == 1 and ran_on[0].startswith("refine"), ran_on
