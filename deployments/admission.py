"""What a replica takes on, and when: no HTTP, no Ray.

``Admission`` refuses at once a request that could not finish within the
deadline; ``PixelBudget`` bounds the decoded pixels held at once (the ingress's
requests on its event loop, the bulk actor's calls on their threads);
``ModelFree`` is a model replica's "free for the next batch" gate.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from deployments.errors import Overloaded

# Places of an ingress replica's max_ongoing_requests that image requests leave free.
HEALTH_RESERVE = 4


def images_in_flight(max_ongoing_requests: int) -> int:
    """The image requests one replica takes at once.

    Serve queues every request behind ``max_ongoing_requests``, /healthz and
    /models included: image work leaves ``HEALTH_RESERVE`` places to them where
    the cap is large enough to spare them (serve_config.yaml's 96), and takes the
    whole cap where it is small (Serve's default, 5).
    """
    if max_ongoing_requests >= 4 * HEALTH_RESERVE:
        return max_ongoing_requests - HEALTH_RESERVE
    return max_ongoing_requests


class Places:
    """The requests one replica takes at once, over all its lanes (``Admission``s
    that share it): ``max_in_flight``, a cap under Serve's own
    ``max_ongoing_requests`` (None: no cap).

    Serve queues every request behind ``max_ongoing_requests``, /healthz
    included, and answers 503 when its queue is full; requests refused here keep
    the last places free for those.
    """

    def __init__(self, max_in_flight: int | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.lanes: list[Admission] = []

    def taken(self) -> int:
        """Requests admitted or reading their body, in every lane."""
        return sum(lane.in_flight + lane.reading for lane in self.lanes)


class Admission:
    """Admit a request only if it can finish within the deadline, at the measured rate.

    The rate is this replica's completions per second of *busy* time (time with
    at least one request in flight), over its last ``window`` completions: it is
    what the replica does when it has work, whatever the load was. A request that
    would wait longer than ``deadline_s`` behind the ones in flight is refused at
    once with ``Overloaded``; its Retry-After is the time the requests in flight
    now need to drain. (A shorter one, the time until one more could be admitted,
    brings every refused client back at once: refusals then cost more CPU than
    the work they make room for.) Until ``window`` completions are in, the rate
    is ``initial_rate`` (from the warm-up).

    One ``Admission`` is one lane: the requests for one model deployment, whose
    rate is theirs alone (a pool that loads models, or a slower model, never
    makes another model's requests look slow). Lanes of one replica share its
    ``Places``, the cap on requests at once.
    """

    def __init__(
        self,
        deadline_s: float,
        initial_rate: float,
        window: int = 32,
        max_in_flight: int | None = None,
        what: str = "requests",
        measured_after: int | None = None,
        places: Places | None = None,
    ) -> None:
        self.deadline_s = deadline_s
        # What it admits, in its refusals ("requests", "refinements").
        self.what = what
        self.initial_rate = initial_rate
        self.places = places or Places(max_in_flight)
        self.places.lanes.append(self)
        self.in_flight = 0
        # Requests reading their body, not admitted yet: they count against the
        # cap (each holds one of Serve's places) but not against the deadline
        # (a slow client costs a connection, not work).
        self.reading = 0
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._completions: deque[float] = deque(maxlen=window)
        # Completions before the measured rate replaces ``initial_rate`` (the
        # whole window unless told: for slow work, whose first estimate is rough).
        self.measured_after = max(2, min(window, measured_after or window))

    def lane(self, initial_rate: float | None = None) -> Admission:
        """Another lane of this replica: its own rate, the same deadline and places."""
        return Admission(
            self.deadline_s,
            self.initial_rate if initial_rate is None else initial_rate,
            self._completions.maxlen or 32,
            what=self.what,
            measured_after=self.measured_after,
            places=self.places,
        )

    @property
    def max_in_flight(self) -> int | None:
        """The cap of the places this lane shares (None: none)."""
        return self.places.max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int | None) -> None:
        self.places.max_in_flight = value

    def _busy_clock(self) -> float:
        running = 0.0 if self._busy_since is None else time.monotonic() - self._busy_since
        return self._busy_s + running

    def rate(self) -> float:
        """Completions per busy second (the measured one once ``measured_after``
        completions are in)."""
        done = self._completions
        if len(done) >= self.measured_after and done[-1] > done[0]:
            return (len(done) - 1) / (done[-1] - done[0])
        return self.initial_rate

    def expected_s(self) -> float:
        """How long a request admitted now would take to finish."""
        return (self.in_flight + 1) / self.rate()

    def check(self) -> None:
        """Raise ``Overloaded`` (503) if a request admitted now would miss the
        deadline; count nothing in (a request is refused this way before its
        body is read, and admitted with ``admit`` once it is)."""
        expected = self.expected_s()
        taken = self.places.taken()
        full = self.max_in_flight is not None and taken >= self.max_in_flight
        # A lane with nothing in progress always takes one, if there is a place.
        late = expected > self.deadline_s and self.in_flight + self.reading > 0
        if (full and taken > 0) or late:
            # The time this lane's requests need to drain; when the replica is full,
            # every lane's (a refusal for want of places retries once they free).
            drain = max(1, self.in_flight) / self.rate()
            if full:
                drain = max(drain, sum(lane.in_flight / lane.rate() for lane in self.places.lanes))
            drain_s = max(1, math.ceil(drain))
            why = (
                f"{taken} {self.what} in progress, the most this replica takes"
                if full
                else f"{self.in_flight} {self.what} in flight; one more would finish in "
                f"about {expected:.0f}s, over the {self.deadline_s:.0f}s deadline"
            )
            raise Overloaded(f"busy: {why}; retry in {drain_s}s", retry_after_s=drain_s)

    def admit(self) -> None:
        """Count a request in, or raise ``Overloaded`` (503) if it would miss the deadline."""
        self.check()
        if self.in_flight == 0:
            self._busy_since = time.monotonic()
        self.in_flight += 1

    def release(self, completed: bool) -> None:
        """Count a request out; ``completed``: it got its mask (it counts for the rate)."""
        if completed:
            self._completions.append(self._busy_clock())
        self.in_flight -= 1
        if self.in_flight == 0 and self._busy_since is not None:
            self._busy_s += time.monotonic() - self._busy_since
            self._busy_since = None


def when_done(futures: Collection[Future[Any]], then: Callable[[], None]) -> None:
    """Call ``then`` once every one of ``futures`` is done: now if they all are,
    else on the thread that ends the last (a stage still running on its thread
    after its request was cancelled keeps what it holds until it ends)."""
    pending = [f for f in futures if not f.done()]
    if not pending:
        then()
        return
    left = [len(pending)]
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            then()

    for future in pending:
        future.add_done_callback(one_done)


@dataclass(eq=False)
class _Waiter:
    """One holder waiting for room; ``granted`` is set under the budget's lock."""

    amount: int
    wake: Callable[[], None]
    abandoned: Callable[[], bool] = lambda: False
    granted: bool = False


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> Callable[[], None]:
    """Resolve ``future`` from whichever thread grants it room."""

    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    def wake() -> None:
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            resolve()
        else:
            loop.call_soon_threadsafe(resolve)

    return wake


class PixelBudget:
    """A first-come, first-served semaphore over decoded pixels.

    A holder takes its image's (or batch's) pixels from decode to encode; one
    that does not fit waits (not decoded: only its compressed bytes are held)
    until enough is released, and takes what it needs in one step, never part of
    it while waiting for the rest. One larger than the whole budget waits for all
    of it. ``hold`` waits on the event loop (the ingress), ``hold_sync`` blocks
    its thread (the bulk actor's calls); both may share one budget.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    @asynccontextmanager
    async def hold(self, pixels: int, running: Collection[Future[Any]] = ()) -> AsyncIterator[None]:
        """Hold ``pixels`` for the block; ``running``: the holder's work on threads,
        read when the block ends: what of it still runs then (the block was
        cancelled under it) keeps the room until it ends."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = _Waiter(min(pixels, self.capacity), _resolver(loop, future), future.cancelled)
        if not self._take_or_queue(waiter):
            try:
                await future
            except asyncio.CancelledError:
                if self._withdraw(waiter):
                    self._release(waiter.amount)  # granted just as it was cancelled
                raise
        try:
            yield
        finally:
            when_done(list(running), lambda: self._release(waiter.amount))

    @contextmanager
    def hold_sync(self, pixels: int) -> Iterator[None]:
        """``hold`` for a worker thread: blocks it until there is room (never call
        it on an event loop)."""
        room = threading.Event()
        waiter = _Waiter(min(pixels, self.capacity), room.set)
        if not self._take_or_queue(waiter):
            room.wait()
        try:
            yield
        finally:
            self._release(waiter.amount)

    def _take_or_queue(self, waiter: _Waiter) -> bool:
        """Take ``waiter``'s room now (True) if it fits and no one waits; else queue it."""
        with self._lock:
            if not self._waiters and waiter.amount <= self.free:
                self.free -= waiter.amount
                return True
            self._waiters.append(waiter)
            return False

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Take ``waiter`` out of the queue; True if it had been granted its room
        already (the caller then gives it back)."""
        with self._lock:
            if waiter.granted:
                return True
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            granted = self._grant()
        for each in granted:
            each.wake()
        return False

    def _release(self, amount: int) -> None:
        with self._lock:
            self.free += amount
            granted = self._grant()
        for each in granted:
            each.wake()

    def _grant(self) -> list[_Waiter]:
        """Under the lock: room for the waiters at the head of the queue that fit now."""
        granted = []
        while self._waiters and self._waiters[0].amount <= self.free:
            waiter = self._waiters.popleft()
            if waiter.abandoned():
                continue
            self.free -= waiter.amount
            waiter.granted = True
            granted.append(waiter)
        return granted


class ModelFree:
    """A model replica's "free for the next batch" gate (a pull queue).

    Requests that arrive while a batch runs wait here and enter ``@serve.batch``
    together when it ends, so that the next batch forms when the model is free
    instead of on the batch timer while it is busy.
    """

    def __init__(self) -> None:
        self._free = asyncio.Event()
        self._free.set()

    def is_set(self) -> bool:
        """True while no batch runs (the model is free)."""
        return self._free.is_set()

    async def wait(self) -> None:
        """Until no batch runs."""
        await self._free.wait()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """A batch runs: arrivals wait until it ends, however it ends."""
        self._free.clear()
        try:
            yield
        finally:
            self._free.set()
