"""Loaded models under a byte budget: least recently used out, leased ones kept, one load at a time.

``ModelPool`` is what a pool replica holds: any of its named models may be
loaded, each charged its bytes against the budget. A request takes a lease on
its model (loading it on a miss) and gives it back when its batch is done; a
leased model is never evicted. Before a load, least recently used models that no
request holds are evicted until the new one's bytes fit; after it, once its own
bytes are measured, again if the guess was short. When every loaded model is
held, a load waits ``drain_after_s`` for one to be let go; then the least
recently used one takes no new leases until it can go, so that steady hits never
hold a load off. Concurrent first requests for
a cold model share one load; loads run one at a time, so that a load's measured
memory is its own. A model that fails to load fails its requests for
``retry_failed_s`` without another try. No Ray, no HTTP: the Serve shell
(``deployments.pool_server``) gives it a loader and maps ``LoadFailed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

M = TypeVar("M")

Event = Literal["hit", "miss", "load", "evict", "failure"]


@dataclass(frozen=True)
class Loaded(Generic[M]):
    """What a loader gives back: the model, and the bytes its load took (measured)."""

    model: M
    bytes: int


class LoadFailed(Exception):
    """``name`` could not be loaded; the pool tries again after ``retry_after_s``."""

    def __init__(self, name: str, reason: str, retry_after_s: float) -> None:
        super().__init__(f"model {name!r} could not be loaded ({reason})")
        self.name = name
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class Slot(Generic[M]):
    """One model of the pool: loaded or not, and what has happened to it."""

    name: str
    # Bytes stated in the config; when None, the bytes its last load measured.
    declared: int | None = None
    model: M | None = None
    measured: int | None = None
    leases: int = 0
    # Requests waiting for this model's load: pinned like leases.
    waiting: int = 0
    # Chosen to go when its leases end: it takes no new ones meanwhile.
    draining: bool = False
    loading: asyncio.Future[None] | None = None
    used_at: int = 0
    hits: int = 0
    loads: int = 0
    evictions: int = 0
    failures: int = 0
    load_s: float | None = None
    error: str | None = None
    failed_at: float | None = None

    @property
    def bytes(self) -> int | None:
        """What it is charged against the budget (None: never loaded, nothing declared)."""
        return self.declared if self.declared is not None else self.measured

    @property
    def pinned(self) -> bool:
        return self.leases > 0 or self.waiting > 0


class ModelPool(Generic[M]):
    """The models of one replica under ``budget_bytes``; see the module's docstring."""

    def __init__(
        self,
        budget_bytes: int,
        load: Callable[[str], Awaitable[Loaded[M]]],
        names: Iterable[str],
        declared: Mapping[str, int | None] | None = None,
        retry_failed_s: float = 30.0,
        drain_after_s: float = 2.0,
        on_event: Callable[[Event, str, float], None] | None = None,
        on_evict: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_bytes = budget_bytes
        self._load_fn = load
        self.slots: dict[str, Slot[M]] = {
            name: Slot(name, (declared or {}).get(name)) for name in names
        }
        self.retry_failed_s = retry_failed_s
        # How long a load waits for a held model to be let go before draining one.
        self.drain_after_s = drain_after_s
        self._on_event = on_event
        self._on_evict = on_evict
        self._clock = clock
        self._tick = 0
        self._one_load = asyncio.Lock()
        # Set (and replaced) when a lease is given back or a model evicted.
        self._changed = asyncio.Event()

    @property
    def used_bytes(self) -> int:
        return sum(s.bytes or 0 for s in self.slots.values() if s.model is not None)

    def loaded(self) -> list[str]:
        """The loaded models, least recently used first."""
        return [s.name for s in sorted(self.slots.values(), key=lambda s: s.used_at) if s.model]

    def _event(self, event: Event, name: str, seconds: float = 0.0) -> None:
        if self._on_event is not None:
            self._on_event(event, name, seconds)

    def _slot(self, name: str) -> Slot[M]:
        try:
            return self.slots[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not in the pool") from None

    def _touch(self, slot: Slot[M]) -> None:
        self._tick += 1
        slot.used_at = self._tick

    @asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[M]:
        """The loaded model ``name``, kept loaded until the block ends."""
        model = await self.acquire(name)
        try:
            yield model
        finally:
            self.release(name)

    def peek(self, name: str) -> M:
        """The loaded model ``name``, for a caller that holds a lease on it."""
        model = self._slot(name).model
        if model is None:
            raise RuntimeError(f"model {name!r} is not loaded (no lease held?)")
        return model

    async def ensure(self, name: str) -> None:
        """Load ``name`` if it is not loaded (a lease taken and given back)."""
        async with self.lease(name):
            pass

    async def acquire(self, name: str) -> M:
        """A lease on ``name``: loaded first if need be. ``LoadFailed`` if it cannot be."""
        slot = self._slot(name)
        if slot.model is not None and not slot.draining:
            slot.hits += 1
            self._event("hit", name)
        else:
            self._event("miss", name)
        while slot.model is None or slot.draining:
            if slot.draining:
                # Held for eviction: wait until it is gone, then load it again.
                await self._changed.wait()
                continue
            if slot.loading is None:
                self._check_not_failing(slot)
                slot.loading = asyncio.ensure_future(self._load(slot))
            loading = slot.loading
            slot.waiting += 1
            try:
                # Shielded: one waiter's cancellation does not cancel the others' load.
                await asyncio.shield(loading)
            finally:
                slot.waiting -= 1
        model: M = slot.model
        slot.leases += 1
        self._touch(slot)
        return model

    def release(self, name: str) -> None:
        slot = self._slot(name)
        slot.leases -= 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _check_not_failing(self, slot: Slot[M]) -> None:
        if slot.failed_at is None or slot.error is None:
            return
        left = slot.failed_at + self.retry_failed_s - self._clock()
        if left > 0:
            raise LoadFailed(slot.name, slot.error, left)

    def _guess(self, slot: Slot[M]) -> int:
        """Bytes to make room for before a load: its own when known, else the
        largest of any model here (models of one pool are often alike)."""
        if slot.bytes is not None:
            return slot.bytes
        return max((s.bytes or 0 for s in self.slots.values()), default=0)

    async def _load(self, slot: Slot[M]) -> None:
        try:
            async with self._one_load:
                await self._make_room(self._guess(slot), slot)
                started = self._clock()
                try:
                    loaded = await self._load_fn(slot.name)
                except Exception as exc:
                    slot.failures += 1
                    slot.error = type(exc).__name__
                    slot.failed_at = self._clock()
                    self._event("failure", slot.name, slot.failed_at - started)
                    raise LoadFailed(slot.name, slot.error, self.retry_failed_s) from exc
                slot.load_s = self._clock() - started
                slot.model, slot.measured = loaded.model, loaded.bytes
                slot.error = slot.failed_at = None
                slot.loads += 1
                self._touch(slot)
                self._event("load", slot.name, slot.load_s)
                # Its measured bytes may exceed the guess: make room for them now.
                self._evict_until(self.budget_bytes, slot)
        finally:
            slot.loading = None

    async def _make_room(self, need: int, keep: Slot[M]) -> None:
        """Evict until ``need`` more bytes fit; a model alone in the pool loads
        whatever its size. When every loaded model is held, the load first waits
        up to ``drain_after_s`` for one to be let go (so that a loaded model
        serves what is queued for it, rather than each load serving one request
        when traffic cycles through more models than fit); then the least
        recently used one is drained: it takes no new leases, and goes when its
        last ends (else steady hits on the loaded models would hold a load off
        for ever)."""
        started = time.monotonic()
        try:
            while True:
                self._evict_until(self.budget_bytes - need, keep)
                others = [n for n in self.loaded() if self.slots[n] is not keep]
                if self.used_bytes + need <= self.budget_bytes or not others:
                    return
                left = self.drain_after_s - (time.monotonic() - started)
                if left > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), left)
                    continue
                self.slots[others[0]].draining = True
                await self._changed.wait()
        finally:
            for slot in self.slots.values():
                if slot.draining:
                    slot.draining = False
                    self._notify()

    def _evict_until(self, limit: int, keep: Slot[M]) -> None:
        for name in self.loaded():
            if self.used_bytes <= limit:
                return
            slot = self.slots[name]
            if slot is keep or slot.pinned:
                continue
            self._evict(slot)

    def _evict(self, slot: Slot[M]) -> None:
        slot.model = None
        slot.draining = False
        slot.evictions += 1
        self._notify()
        self._event("evict", slot.name)
        if self._on_evict is not None:
            self._on_evict(slot.name)
