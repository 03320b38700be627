"""The remove service without Serve: the stages in a thread pool, around a model call.

``Remover`` is what one ingress replica does for each image: ``prepare`` (decode,
resize to the model size) in its pool, the mask from the model's ``Predict``,
``finish`` (mask upscale, compose, encode) in its pool. Around that it bounds what
one replica takes on (``deployments.admission``: the deadline, the pixel budget),
runs alpha matting and decontamination on threads of their own, and gives memory
back when idle (``deployments.memory``). The Serve ingress gives it model handles;
the benchmark and the tests give it in-process models, so both measure the same
code. Imports no Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Set
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from deployments.admission import Admission, PixelBudget, when_done
from deployments.compose import warm_refine
from deployments.decode import probe
from deployments.errors import Overloaded, PayloadTooLarge, UnknownModel
from deployments.memory import IdleTrimmer, reuse_image_memory
from deployments.models import ModelSpec, spec_for
from deployments.options import CutoutOptions, Fidelity, OutputFormat
from deployments.pipeline import ImageSettings, finish, prepare, sample_jpeg
from deployments.refine import compile_refiners_aside, quiet_for

if TYPE_CHECKING:
    from deployments.settings import AppSettings

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

# A model's mask for one model-size uint8 (H, W, 3) image: a Serve handle call,
# or an in-process model.
Predict = Callable[[npt.NDArray[np.uint8]], Awaitable[npt.NDArray[np.uint8]]]

# libwebp's limit on either side of an image.
WEBP_MAX_SIDE = 16383

# Until refinements are measured, one takes this long (matting 1 MP on 2 cores
# took ~10 s cold, ~2.5 s warm at 12 MP): few are admitted before the rate is known.
REFINE_INITIAL_S = 10.0
# Refinements completed that their rate is measured over: few, as they are slow
# (measured from the second on).
REFINE_WINDOW = 4


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


@dataclass(frozen=True)
class RemoverConfig:
    """What ``Remover`` reads of the application's settings."""

    default_model: str
    image: ImageSettings
    refine_concurrency: int
    deadline_s: float

    @classmethod
    def of(cls, settings: AppSettings) -> RemoverConfig:
        return cls(
            default_model=settings.default_model_name,
            image=ImageSettings.of(settings),
            refine_concurrency=settings.refine_concurrency,
            deadline_s=settings.deadline_s,
        )


class Remover:
    """Decode, resize, ask the model, compose, encode: one replica's share of the work."""

    def __init__(
        self,
        config: RemoverConfig,
        models: Mapping[str, Predict],
        threads: int,
        max_in_flight: int | None = None,
        specs: Mapping[str, ModelSpec] | None = None,
        lazy: Set[str] = frozenset(),
    ) -> None:
        self.config = config
        self.models = dict(models)
        # A model's constants: from ``specs`` (a pooled model named apart from its
        # table entry), else the table's entry of its name.
        self.specs = {name: (specs or {}).get(name) or spec_for(name) for name in models}
        # Models the warm-up leaves alone (loaded on demand: the pool's).
        self.lazy = lazy
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="stages")
        self.refine_pool = ThreadPoolExecutor(
            config.refine_concurrency, thread_name_prefix="refine"
        )
        self.budget = PixelBudget(config.image.pixel_budget)
        reuse_image_memory(config.image.pixel_budget)
        self.refine_state: dict[str, object] = {"warm": False}
        # Until the warm-up times one image: ten in the deadline.
        self.admission = Admission(
            config.deadline_s, 10 / config.deadline_s, max_in_flight=max_in_flight
        )
        # One lane (rate) per model deployment, sharing the replica's places: the
        # default model's is ``admission``; the pooled models share one (a model
        # the pool loads never makes a dedicated model's requests look slow).
        pool_lane = self.admission.lane() if lazy else self.admission
        self.lanes: dict[str, Admission] = {}
        for name in self.models:
            if name in lazy:
                self.lanes[name] = pool_lane
            elif name == config.default_model:
                self.lanes[name] = self.admission
            else:
                self.lanes[name] = self.admission.lane()
        # Matting and decontamination queue for their own threads: admitted by
        # that queue's own drain time, so that a flood of them is refused once it
        # cannot finish in time, and plain requests never wait behind them.
        self.refine_admission = Admission(
            config.deadline_s,
            1 / REFINE_INITIAL_S,
            REFINE_WINDOW,
            what="refinements",
            measured_after=2,
        )
        # A refinement's turn on the refine threads, taken before it decodes:
        # one waiting for its turn holds its compressed bytes only, not pixels.
        self.refine_turns = PixelBudget(config.refine_concurrency)
        self.trimmer = IdleTrimmer(lambda: not self.busy(), self.pool)

    def busy(self) -> bool:
        """Whether a request is in flight."""
        lanes = self.admission.places.lanes
        return sum(lane.in_flight for lane in lanes) + self.refine_admission.in_flight > 0

    def lane(self, model: str | None, refining: bool) -> Admission:
        """The admission a request for ``model`` (None: the default) goes through:
        refinements queue apart, an unknown model (a 404 later) the default's."""
        if refining:
            return self.refine_admission
        default = self.lanes.get(self.config.default_model, self.admission)
        return self.lanes.get(model or self.config.default_model, default)

    @staticmethod
    async def on_thread(executor: Executor, running: list[Future[Any]], fn: Callable[[], T]) -> T:
        """``fn()`` on ``executor``, its future added to ``running`` (what a
        cancelled request still has running, and holds memory and places for,
        until it ends). Cancelled before it starts, it never runs."""
        future = executor.submit(fn)
        running.append(future)
        return await asyncio.wrap_future(future)

    def model_name(self, job: Job) -> str:
        """The model ``job`` goes to; ``UnknownModel`` (404) if it is not served here."""
        name = job.model or self.config.default_model
        if name not in self.models:
            raise UnknownModel(
                f"model {name!r} is not served here; available: {', '.join(self.models)}"
            )
        return name

    @asynccontextmanager
    async def reading(self, refining: bool, model: str | None = None) -> AsyncIterator[None]:
        """While a request's body is read: ``Overloaded`` (503) at once if it would
        be refused now (a flood is refused without reading it); counted against
        the cap on requests, not against the deadline, until the block ends.
        ``refining``: it asks for matting or decontamination; ``model``: the one
        it names, where known before the body (None: the default's lane)."""
        admission = self.lane(model, refining)
        if model is None and not refining:
            # The model is in the body (rembg's form): refused now only if no
            # model's lane would take it (admission proper follows the body).
            self._check_any(admission)
        else:
            admission.check()
        admission.reading += 1
        try:
            yield
        finally:
            admission.reading -= 1

    def _check_any(self, first: Admission) -> None:
        """``Overloaded`` from ``first`` unless some lane would take a request now."""
        try:
            first.check()
        except Overloaded:
            for lane in dict.fromkeys(self.lanes.values()):
                try:
                    lane.check()
                except Overloaded:
                    continue
                return
            raise

    async def serve(self, job: Job) -> Served:
        """``remove`` under admission: ``Overloaded`` (503) if it would miss the
        deadline (a refinement: if the refine queue would not drain in time).

        Admitted once the body is read: a client that sends slowly holds a
        connection, not a place. Cancelled (the client left), the request stops
        at the next stage; what still runs on a thread then keeps its place and
        pixels until it ends, and the replica counts as busy until then.
        """
        name = self.model_name(job)
        admission = self.lane(name, job.options.alpha_matting or job.options.decontaminate)
        admission.admit()
        running: list[Future[Any]] = []
        completed = False
        try:
            served = await self.remove(job, running, name)
            completed = True
            return served
        finally:
            leave = partial(self._leave, admission, completed)
            if all(future.done() for future in running):
                leave()
            else:
                loop = asyncio.get_running_loop()

                def on_the_loop() -> None:
                    loop.call_soon_threadsafe(leave)

                when_done(running, on_the_loop)

    def _leave(self, admission: Admission, completed: bool) -> None:
        """On the event loop: a request's work has ended (memory is given back
        when the replica goes idle: ``IdleTrimmer``)."""
        admission.release(completed)
        if not self.busy():
            self.trimmer.went_idle()

    async def remove(
        self, job: Job, running: list[Future[Any]] | None = None, name: str | None = None
    ) -> Served:
        """The cut-out of ``job``, without admission; ``running`` collects its work
        on threads (see ``serve``)."""
        name = name or self.model_name(job)
        running = [] if running is None else running
        limits, level = self.config.image.limits, self.config.image.png_compress_level
        started = time.perf_counter()
        width, height = await self.on_thread(self.pool, running, partial(probe, job.data, limits))
        if job.format == "webp" and max(width, height) > WEBP_MAX_SIDE:
            raise PayloadTooLarge(
                f"WebP output is at most {WEBP_MAX_SIDE} px a side; this image is "
                f"{width}x{height}: ask for format=png"
            )
        # Matting and decontamination take seconds: on threads of their own, and
        # decoded only once it is their turn there.
        refining = job.options.alpha_matting or job.options.decontaminate
        async with AsyncExitStack() as holding:
            if refining:
                await holding.enter_async_context(self.refine_turns.hold(1, running))
            await holding.enter_async_context(self.budget.hold(width * height, running))
            prepared = await self.on_thread(
                self.pool, running, partial(prepare, job.data, self.specs[name], limits)
            )
            inferred = time.perf_counter()
            mask = await self.models[name](prepared.model_input)
            composed = time.perf_counter()
            done = await self.on_thread(
                self.refine_pool if refining else self.pool,
                running,
                partial(
                    finish,
                    prepared.image,
                    mask,
                    job.options,
                    job.format,
                    level,
                    self.config.image.refine,
                    job.fidelity or self.config.image.fidelity,
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
        Its time is its lane's first rate estimate (the pooled models': the
        slowest dedicated model's). Best effort: a model that cannot answer fails
        its own replica's start.
        """
        data = sample_jpeg(self.config.image.limits)
        rates: dict[str, float] = {}
        for name in self.models:
            if name in self.lazy:
                continue
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
                rates[name] = 1 / took
                logger.info(
                    "warm through %s in %.2fs; one image then took %.2fs",
                    name,
                    warmed - started,
                    took,
                )
        # A first estimate of the rate admission judges by: one image at a time
        # (pipelining and batching only do better).
        for name, lane in self.lanes.items():
            if name in rates:
                lane.initial_rate = rates[name]
            elif rates:
                lane.initial_rate = min(rates.values())

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
                await compile_refiners_aside(self.busy)
                await quiet_for(self.busy, 1.0, patience_s=60.0)
            await loop.run_in_executor(self.refine_pool, warm_refine)
        except Exception as exc:
            logger.warning("refine warm-up failed: %r", exc)
            self.refine_state = {"warm": False, "error": type(exc).__name__}
            return
        took = time.perf_counter() - started
        logger.info("refiners (matting, decontamination) warm in %.2fs", took)
        self.refine_state = {"warm": True, "warm_s": round(took, 3)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.refine_pool.shutdown(wait=False, cancel_futures=True)
