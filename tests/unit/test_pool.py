"""The model pool without Serve: byte budget, LRU order, leases pin, one load per cold model."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest

from deployments.pool import Event, Loaded, LoadFailed, ModelPool
from deployments.settings import AppSettings

NAMES = ("a", "b", "c", "d")


@dataclass
class Loader:
    """Loads models named in ``sizes`` (bytes it "measures"); ``broken`` ones raise.
    ``gate``, when set, holds every load until it is opened."""

    sizes: dict[str, int]
    broken: set[str] = field(default_factory=set)
    gate: asyncio.Event | None = None
    calls: Counter[str] = field(default_factory=Counter)
    running: int = 0
    most_at_once: int = 0

    async def __call__(self, name: str) -> Loaded[str]:
        self.calls[name] += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if name in self.broken:
                raise OSError(f"{name}: not an ONNX file")
            return Loaded(f"model-{name}", self.sizes[name])
        finally:
            self.running -= 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pool_of(
    loader: Loader, budget: int, declared: dict[str, int | None] | None = None, **kwargs: object
) -> tuple[ModelPool[str], list[tuple[Event, str]]]:
    events: list[tuple[Event, str]] = []
    pool: ModelPool[str] = ModelPool(
        budget,
        loader,
        NAMES,
        declared,
        on_event=lambda e, n, _s: events.append((e, n)),
        **kwargs,  # type: ignore[arg-type]
    )
    return pool, events


def test_least_recently_used_goes_when_a_new_model_would_not_fit() -> None:
    async def scenario() -> None:
        loader = Loader(dict.fromkeys(NAMES, 100))
        pool, events = pool_of(loader, budget=250)
        evicted: list[str] = []
        pool._on_evict = evicted.append
        for name in ("a", "b", "a", "c", "d", "a"):
            async with pool.lease(name) as model:
                assert model == f"model-{name}"
            assert pool.used_bytes <= 250
            assert len(pool.loaded()) <= 2
        # a b [a hit] c (evicts b, the least recent) d (evicts a) a (evicts c)
        assert evicted == ["b", "a", "c"]
        assert pool.loaded() == ["d", "a"]
        assert loader.calls == Counter({"a": 2, "b": 1, "c": 1, "d": 1})
        assert Counter(e for e, _ in events) == Counter(
            {"miss": 5, "load": 5, "hit": 1, "evict": 3}
        )
        assert pool.slots["a"].hits == 1 and pool.slots["a"].loads == 2
        assert pool.slots["a"].evictions == 1

    asyncio.run(scenario())


def test_a_model_under_lease_is_never_evicted_and_a_load_waits_for_room() -> None:
    async def scenario() -> None:
        loader = Loader(dict.fromkeys(NAMES, 100))
        pool, _ = pool_of(loader, budget=150)
        held = await pool.acquire("a")
        assert held == "model-a"
        loading = asyncio.create_task(pool.acquire("b"))
        await asyncio.sleep(0.05)
        # "a" is leased (a batch in flight): "b" may not evict it, and waits.
        assert not loading.done() and pool.loaded() == ["a"]
        assert loader.calls["b"] == 0
        pool.release("a")
        assert await asyncio.wait_for(loading, 1) == "model-b"
        assert pool.loaded() == ["b"]
        pool.release("b")

    asyncio.run(scenario())


def test_steady_hits_on_held_models_never_hold_a_load_off() -> None:
    async def scenario() -> None:
        loader = Loader(dict.fromkeys(NAMES, 100))
        pool, _ = pool_of(loader, budget=250, drain_after_s=0.1)
        await pool.acquire("a")
        await pool.acquire("b")
        loading = asyncio.create_task(pool.acquire("c"))
        await asyncio.sleep(0.02)
        # Both held: the load waits for one to be let go, draining none yet.
        assert not any(s.draining for s in pool.slots.values()) and not loading.done()
        await asyncio.sleep(0.15)
        # Still both held after drain_after_s: "a", the least recently used, is
        # drained: a new request for it waits (it will load again), while "b"
        # still takes requests.
        assert pool.slots["a"].draining and not loading.done()
        again = asyncio.create_task(pool.acquire("a"))
        assert await asyncio.wait_for(pool.acquire("b"), 1) == "model-b"
        await asyncio.sleep(0.01)
        assert not again.done()
        pool.release("a")  # its last lease ends: it goes, "c" loads
        assert await asyncio.wait_for(loading, 1) == "model-c"
        assert pool.slots["a"].evictions == 1
        for name in ("b", "b", "c"):
            pool.release(name)
        assert await asyncio.wait_for(again, 1) == "model-a"
        pool.release("a")
        assert len(pool.loaded()) == 2 and not any(s.draining for s in pool.slots.values())

    asyncio.run(scenario())


def test_a_load_takes_the_first_model_let_go_before_draining_one() -> None:
    async def scenario() -> None:
        loader = Loader(dict.fromkeys(NAMES, 100))
        pool, _ = pool_of(loader, budget=250, drain_after_s=5)
        await pool.acquire("a")
        await pool.acquire("b")
        loading = asyncio.create_task(pool.acquire("c"))
        await asyncio.sleep(0.02)
        pool.release("b")  # "b"'s queue is served: it goes, not the older "a"
        assert await asyncio.wait_for(loading, 1) == "model-c"
        assert pool.slots["b"].evictions == 1 and pool.slots["a"].evictions == 0
        assert not any(s.draining for s in pool.slots.values())
        pool.release("a")
        pool.release("c")

    asyncio.run(scenario())


def test_concurrent_first_requests_share_one_load() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        loader = Loader(dict.fromkeys(NAMES, 100), gate=gate)
        pool, events = pool_of(loader, budget=1000)

        async def request(name: str) -> str:
            async with pool.lease(name) as model:
                await asyncio.sleep(0.01)
                return model

        tasks = [asyncio.create_task(request(n)) for n in ("a",) * 6 + ("b",) * 2]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert results == ["model-a"] * 6 + ["model-b"] * 2
        assert loader.calls == Counter({"a": 1, "b": 1})
        # One load at a time, so that each load's measured bytes are its own.
        assert loader.most_at_once == 1
        assert Counter(e for e, _ in events)["load"] == 2
        assert all(s.leases == 0 and s.waiting == 0 for s in pool.slots.values())

    asyncio.run(scenario())


def test_measured_bytes_over_the_guess_evict_more_after_the_load() -> None:
    async def scenario() -> None:
        loader = Loader({"a": 100, "b": 100, "c": 300, "d": 100})
        pool, _ = pool_of(loader, budget=350)
        for name in ("a", "b"):
            await pool.ensure(name)
        # "c" is guessed at 100 (the largest seen): "a" goes; it measures 300:
        # "b" goes too, and the pool is back within its budget.
        await pool.ensure("c")
        assert pool.loaded() == ["c"] and pool.used_bytes == 300
        # "a"'s 100 bytes are known now: room is made for them before it loads.
        await pool.ensure("a")
        assert pool.loaded() == ["a"] and pool.used_bytes == 100

    asyncio.run(scenario())


def test_declared_bytes_are_charged_instead_of_measured_ones() -> None:
    async def scenario() -> None:
        loader = Loader(dict.fromkeys(NAMES, 10))
        pool, _ = pool_of(loader, budget=250, declared=dict.fromkeys(NAMES, 100))
        for name in NAMES:
            await pool.ensure(name)
            assert len(pool.loaded()) <= 2
        assert pool.loaded() == ["c", "d"] and pool.used_bytes == 200
        assert pool.slots["d"].measured == 10

    asyncio.run(scenario())


def test_a_model_larger_than_the_budget_still_loads_alone() -> None:
    async def scenario() -> None:
        loader = Loader({"a": 100, "b": 500, "c": 100, "d": 100})
        pool, _ = pool_of(loader, budget=200)
        await pool.ensure("a")
        await pool.ensure("b")
        assert pool.loaded() == ["b"]

    asyncio.run(scenario())


def test_a_broken_model_fails_its_requests_only_and_is_retried_after_the_wait() -> None:
    async def scenario() -> None:
        clock = Clock()
        loader = Loader(dict.fromkeys(NAMES, 100), broken={"b"})
        pool, events = pool_of(loader, budget=1000, retry_failed_s=30, clock=clock)
        await pool.ensure("a")
        with pytest.raises(LoadFailed, match="'b' could not be loaded") as first:
            await pool.ensure("b")
        assert first.value.reason == "OSError" and first.value.retry_after_s == 30
        clock.now = 10
        # Within the wait: failed again at once, without another load.
        with pytest.raises(LoadFailed) as again:
            await pool.ensure("b")
        assert again.value.retry_after_s == pytest.approx(20)
        assert loader.calls["b"] == 1
        async with pool.lease("a") as model:  # the others are unaffected
            assert model == "model-a"
        slot = pool.slots["b"]
        assert (slot.failures, slot.error, slot.model) == (1, "OSError", None)
        # After it, a fixed file loads.
        clock.now = 31
        loader.broken.clear()
        await pool.ensure("b")
        assert loader.calls["b"] == 2 and slot.error is None and slot.loads == 1
        assert ("failure", "b") in events

    asyncio.run(scenario())


def test_concurrent_requests_for_a_broken_model_share_its_one_failure() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        loader = Loader(dict.fromkeys(NAMES, 100), broken={"c"}, gate=gate)
        pool, _ = pool_of(loader, budget=1000)
        tasks = [asyncio.create_task(pool.ensure("c")) for _ in range(4)]
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, LoadFailed) for r in results)
        assert loader.calls["c"] == 1
        assert pool.slots["c"].waiting == 0 and pool.slots["c"].leases == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_does_not_cancel_the_load_for_the_others() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        loader = Loader(dict.fromkeys(NAMES, 100), gate=gate)
        pool, _ = pool_of(loader, budget=1000)
        first = asyncio.create_task(pool.ensure("a"))
        second = asyncio.create_task(pool.ensure("a"))
        await asyncio.sleep(0.01)
        first.cancel()
        gate.set()
        await asyncio.wait_for(second, 1)
        assert pool.loaded() == ["a"] and loader.calls["a"] == 1
        assert pool.slots["a"].waiting == 0

    asyncio.run(scenario())


def test_an_unknown_name_is_a_key_error() -> None:
    async def scenario() -> None:
        pool, _ = pool_of(Loader({}), budget=100)
        with pytest.raises(KeyError, match="not in the pool"):
            await pool.ensure("zzz")

    asyncio.run(scenario())


def _settings(pool: dict[str, object], **args: object) -> AppSettings:
    return AppSettings.model_validate({"pool": pool, **args})


def test_pool_settings_name_models_apart_from_their_table_entry() -> None:
    settings = _settings(
        {
            "models": [
                {"name": "u2net"},
                {"name": "fine-tune", "model": "u2netp", "path": "/m.onnx"},
            ],
            "budget_bytes": 10**9,
        },
        default_model="fine-tune",
    )
    assert settings.pooled_names == ["u2net", "fine-tune"]
    assert settings.pool is not None and settings.pool.models[1].spec_name == "u2netp"
    assert settings.default_model_name == "fine-tune"
    assert AppSettings().pool is None  # off unless configured


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({"models": [{"name": "mine"}], "budget_bytes": 1}, "not in the model table"),
        ({"models": [{"name": "u2netp"}], "budget_bytes": 1}, "listed twice"),
        ({"models": [{"name": "u2net"}, {"name": "u2net"}], "budget_bytes": 1}, "listed twice"),
        ({"models": [{"name": "u2net"}], "budget_bytes": 0}, "greater than 0"),
        ({"models": [], "budget_bytes": 1}, "at least 1"),
        ({"models": [{"name": "../x", "model": "u2netp"}], "budget_bytes": 1}, "pattern"),
        ({"models": [{"name": "u2net"}], "budget_bytes": 1, "size": 2}, "Extra inputs"),
    ],
)
def test_pool_settings_reject_what_cannot_serve(pool: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _settings(pool)
