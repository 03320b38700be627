"""The remove service without Serve: the stages in a thread pool, around a model call.

``Remover`` is what one ingress replica does for each image: ``prepare`` (decode,
resize to the model size) in its pool, the mask from the model's ``Predict``,
``finish`` (mask upscale, compose, encode) in its pool. Around that it bounds what
one replica takes on: ``Admission`` refuses at once what could not finish within
the deadline, ``PixelBudget`` bounds the decoded images held at once, and alpha
matting and decontamination run on threads of their own. The Serve ingress gives
it model handles; the benchmark and the tests give it in-process models, so both
measure the same code. Imports no Ray.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from deployments.compose import warm_refine
from deployments.decode import probe
from deployments.errors import Overloaded, PayloadTooLarge, UnknownModel
from deployments.models import spec_for
from deployments.options import CutoutOptions, Fidelity, OutputFormat
from deployments.pipeline import (
    finish,
    prepare,
    release_image_memory,
    reuse_image_memory,
    sample_jpeg,
)
from deployments.settings import AppSettings

logger = logging.getLogger("ray.serve")

P = ParamSpec("P")
T = TypeVar("T")

# A model's mask for one model-size uint8 (H, W, 3) image: a Serve handle call,
# or an in-process model.
Predict = Callable[[npt.NDArray[np.uint8]], Awaitable[npt.NDArray[np.uint8]]]

# libwebp's limit on either side of an image.
WEBP_MAX_SIDE = 16383


@dataclass(frozen=True)
class Job:
    """One cut-out to make: the upload, where to route it, what to do, how to encode."""

    data: bytes
    model: str | None
    options: CutoutOptions
    format: OutputFormat = "png"
    fidelity: Fidelity | None = None  # None: the service's setting


@dataclass(frozen=True)
class Timings:
    """Wall seconds per step of one image."""

    pre_s: float
    model_s: float
    post_s: float


@dataclass(frozen=True)
class Served:
    """A finished cut-out, the model that made it and how long each step took."""

    body: bytes
    width: int
    height: int
    model: str
    format: OutputFormat
    timings: Timings


# Places of an ingress replica's max_ongoing_requests that image requests leave free.
HEALTH_RESERVE = 4


def images_in_flight(max_ongoing_requests: int) -> int:
    """The image requests one replica takes at once.

    Serve queues every request behind ``max_ongoing_requests``, /healthz and
    /models included: image work leaves ``HEALTH_RESERVE`` places to them where
    the cap is large enough to spare them (serve_config.yaml's 48), and takes the
    whole cap where it is small (Serve's default, 5).
    """
    if max_ongoing_requests >= 4 * HEALTH_RESERVE:
        return max_ongoing_requests - HEALTH_RESERVE
    return max_ongoing_requests


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
    """

    def __init__(
        self,
        deadline_s: float,
        initial_rate: float,
        window: int = 32,
        max_in_flight: int | None = None,
    ) -> None:
        self.deadline_s = deadline_s
        self.initial_rate = initial_rate
        # A cap under Serve's own (max_ongoing_requests): Serve queues every
        # request behind it, /healthz included, and answers 503 when its queue is
        # full; requests refused here keep the last places free for those.
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._completions: deque[float] = deque(maxlen=window)

    def _busy_clock(self) -> float:
        running = 0.0 if self._busy_since is None else time.monotonic() - self._busy_since
        return self._busy_s + running

    def rate(self) -> float:
        """Completions per busy second (the measured one once the window is full)."""
        done = self._completions
        if len(done) == done.maxlen and done[-1] > done[0]:
            return (len(done) - 1) / (done[-1] - done[0])
        return self.initial_rate

    def expected_s(self) -> float:
        """How long a request admitted now would take to finish."""
        return (self.in_flight + 1) / self.rate()

    def admit(self) -> None:
        """Count a request in, or raise ``Overloaded`` (503) if it would miss the deadline."""
        expected = self.expected_s()
        full = self.max_in_flight is not None and self.in_flight >= self.max_in_flight
        if (expected > self.deadline_s or full) and self.in_flight > 0:
            drain_s = max(1, math.ceil(self.in_flight / self.rate()))
            why = (
                f"{self.in_flight} requests in progress, the most this replica takes"
                if full
                else f"a request now would finish in about {expected:.0f}s, over the "
                f"{self.deadline_s:.0f}s deadline"
            )
            raise Overloaded(f"busy: {why}; retry in {drain_s}s", retry_after_s=drain_s)
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


class PixelBudget:
    """A first-come, first-served semaphore over decoded pixels.

    A request holds its image's pixels from decode to encode; a request that
    does not fit waits (not decoded: only its compressed bytes are held) until
    enough is released. One larger than the whole budget waits for all of it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        amount = min(pixels, self.capacity)
        if self._waiters or amount > self.free:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = (amount, future)
            self._waiters.append(waiter)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release(amount)  # granted just as it was cancelled
                else:
                    self._waiters.remove(waiter)
                    self._wake()
                raise
        else:
            self.free -= amount
        try:
            yield
        finally:
            self._release(amount)

    def _release(self, amount: int) -> None:
        self.free += amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            amount, future = self._waiters.popleft()
            if future.cancelled():
                continue
            self.free -= amount
            future.set_result(None)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, where there is one (Linux)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return None if trim is None else partial(trim, 0)


# The child: killed with the thread that started it (a stopped child would
# otherwise outlive a replica killed meanwhile), at the lowest priority.
_COMPILE_ASIDE = """
import ctypes, os, signal
prctl = getattr(ctypes.CDLL(None), "prctl", None)
if prctl is not None:
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
os.nice(19)
from deployments.compose import warm_refine
warm_refine()
"""


async def _compile_refiners_aside(
    busy: Callable[[], bool], patience_s: float = 120, timeout_s: float = 900
) -> None:
    """``warm_refine`` in a child process at nice 19, paused (SIGSTOP) while
    ``busy()``: it fills numba's disk cache without taking CPU from requests,
    even the little a niced process takes (ONNX Runtime's threads wait for the
    slowest of them). After ``patience_s`` paused it runs on regardless.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _COMPILE_ASIDE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    done = asyncio.ensure_future(process.communicate())
    started = time.monotonic()
    paused, paused_s = False, 0.0
    try:
        while not done.done():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the refiners did not compile in {timeout_s}s")
            pause = busy() and paused_s < patience_s
            if pause != paused:
                with suppress(ProcessLookupError):
                    process.send_signal(signal.SIGSTOP if pause else signal.SIGCONT)
                paused = pause
            tick = time.monotonic()
            await asyncio.wait([done], timeout=0.05)
            paused_s += (time.monotonic() - tick) if paused else 0.0
    finally:
        if not done.done():
            with suppress(ProcessLookupError):
                process.kill()
            await done
    _, err = done.result()
    if process.returncode != 0:
        # Loading in this process will compile instead, and fail with its reason.
        logger.warning("refiners' compile process failed: %s", err.decode(errors="replace")[-500:])


class Remover:
    """Decode, resize, ask the model, compose, encode: one replica's share of the work."""

    def __init__(
        self,
        settings: AppSettings,
        models: Mapping[str, Predict],
        threads: int,
        max_in_flight: int | None = None,
    ) -> None:
        self.settings = settings
        self.models = dict(models)
        self.specs = {name: spec_for(name) for name in models}
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="stages")
        self.refine_pool = ThreadPoolExecutor(
            settings.refine_concurrency, thread_name_prefix="refine"
        )
        self.budget = PixelBudget(settings.pixel_budget)
        reuse_image_memory(settings.pixel_budget)
        self.refine_state: dict[str, object] = {"warm": False}
        # Until the warm-up times one image: ten in the deadline.
        self.admission = Admission(
            settings.deadline_s, 10 / settings.deadline_s, max_in_flight=max_in_flight
        )
        self._trim = _malloc_trim()
        self._trimmed = 0.0
        self._trim_pending = False

    async def in_pool(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, partial(fn, *args, **kwargs))

    def model_name(self, job: Job) -> str:
        """The model ``job`` goes to; ``UnknownModel`` (404) if it is not served here."""
        name = job.model or self.settings.default_model_name
        if name not in self.models:
            raise UnknownModel(
                f"model {name!r} is not served here; available: {', '.join(self.models)}"
            )
        return name

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Admission for one request (``Overloaded`` if it would miss the deadline).

        When the replica goes idle, the image blocks Pillow kept and the C heap's
        freed memory are given back to the system (glibc keeps it otherwise, so a
        burst of large images would leave the replica's RSS at its peak).
        """
        self.admission.admit()
        completed = False
        try:
            yield
            completed = True
        finally:
            self.admission.release(completed)
            if self.admission.in_flight == 0:
                self._trim_when_idle()

    def _trim_when_idle(self, every_s: float = 2.0) -> None:
        """Give Pillow's kept blocks and the C heap's free memory back now, or, if
        that was done less than ``every_s`` ago, once ``every_s`` has passed, if the
        replica is still idle then (the last request of a burst must not leave its
        memory held)."""
        loop = asyncio.get_running_loop()
        wait_s = self._trimmed + every_s - time.monotonic()
        if wait_s <= 0:
            self._trimmed = time.monotonic()
            # Not awaited: the answer does not wait for it.
            loop.run_in_executor(self.pool, self._give_back)
        elif not self._trim_pending:
            self._trim_pending = True
            loop.call_later(wait_s, self._trim_later)

    def _give_back(self) -> None:
        release_image_memory()
        if self._trim is not None:
            self._trim()

    def _trim_later(self) -> None:
        self._trim_pending = False
        if self.admission.in_flight == 0:
            self._trim_when_idle()

    async def remove(self, job: Job) -> Served:
        name = self.model_name(job)
        limits, level = self.settings.limits, self.settings.png_compress_level
        started = time.perf_counter()
        width, height = await self.in_pool(probe, job.data, limits)
        if job.format == "webp" and max(width, height) > WEBP_MAX_SIDE:
            raise PayloadTooLarge(
                f"WebP output is at most {WEBP_MAX_SIDE} px a side; this image is "
                f"{width}x{height}: ask for format=png"
            )
        async with self.budget.hold(width * height):
            prepared = await self.in_pool(prepare, job.data, self.specs[name], limits)
            inferred = time.perf_counter()
            mask = await self.models[name](prepared.model_input)
            composed = time.perf_counter()
            # Matting and decontamination take seconds: on threads of their own.
            refining = job.options.alpha_matting or job.options.decontaminate
            done = await asyncio.get_running_loop().run_in_executor(
                self.refine_pool if refining else self.pool,
                partial(
                    finish,
                    prepared.image,
                    mask,
                    job.options,
                    job.format,
                    level,
                    self.settings.refine,
                    job.fidelity or self.settings.fidelity,
                ),
            )
            del prepared
        ended = time.perf_counter()
        timings = Timings(inferred - started, composed - inferred, ended - composed)
        return Served(done.body, done.width, done.height, name, job.format, timings)

    async def warm_up(self, timeout_s: float = 300) -> None:
        """One photo-sized image through each model's whole path.

        Sets up what a first request would otherwise pay for: the pool's threads,
        Pillow's codecs, the allocator's first large buffers, each model's route.
        Its time is the admission's first rate estimate. Best effort: a model that
        cannot answer fails its own replica's start.
        """
        data = sample_jpeg(self.settings.limits)
        rates = []
        for name in self.models:
            job = Job(data, name, CutoutOptions())
            try:
                # The first pass warms (and may wait for the model to come up);
                # the second is timed.
                started = time.perf_counter()
                await asyncio.wait_for(self.remove(job), timeout_s)
                warmed = time.perf_counter()
                await asyncio.wait_for(self.remove(job), timeout_s)
            except Exception as exc:
                logger.warning("warm-up through %s failed: %r", name, exc)
            else:
                took = time.perf_counter() - warmed
                rates.append(1 / took)
                logger.info(
                    "warm through %s in %.2fs; one image then took %.2fs",
                    name,
                    warmed - started,
                    took,
                )
        if rates:
            # A first estimate of the rate admission judges by: one image at a time,
            # on the slowest model (pipelining and batching only do better).
            self.admission.initial_rate = min(rates)

    async def warm_refine(self, background: bool = True) -> None:
        """Load and run the refiners once (see ``warm_refine``); the outcome is in
        ``refine_state``, which ``GET /models`` shows.

        In the background, so that users do not feel it: pymatting's numba code is
        compiled first in a separate process at the lowest CPU priority, paused
        while requests are in flight (numba caches it on disk; about a minute in a
        fresh environment, a few seconds after), then loaded here once the replica
        has been idle a moment. The load runs on the refine pool, so a matting
        request that comes meanwhile waits for it rather than loading beside it.
        """
        self.refine_state = {"warm": False, "warming": True}
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            if background:
                await _compile_refiners_aside(lambda: self.admission.in_flight > 0)
                await self._idle_for(1.0, patience_s=60.0)
            await loop.run_in_executor(self.refine_pool, warm_refine)
        except Exception as exc:
            logger.warning("refine warm-up failed: %r", exc)
            self.refine_state = {"warm": False, "error": type(exc).__name__}
            return
        took = time.perf_counter() - started
        logger.info("refiners (matting, decontamination) warm in %.2fs", took)
        self.refine_state = {"warm": True, "warm_s": round(took, 3)}

    async def _idle_for(self, seconds: float, patience_s: float) -> None:
        """Until no request has been in flight for ``seconds`` (at most ``patience_s``)."""
        deadline = time.monotonic() + patience_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self.admission.in_flight:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= seconds:
                return
            await asyncio.sleep(0.1)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.refine_pool.shutdown(wait=False, cancel_futures=True)
