"""The remove service without Serve: the stages in a thread pool, around a model call.

``Remover`` is what one ingress replica does for each image: ``prepare`` (decode,
resize to the model size) in its pool, the mask from the model's ``Predict``,
``finish`` (mask upscale, compose, encode) in its pool. The Serve ingress gives it
model handles; the benchmark and the tests give it in-process models, so both
measure the same code. Imports no Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt

from deployments.errors import UnknownModel
from deployments.models import spec_for
from deployments.options import CutoutOptions, OutputFormat
from deployments.pipeline import finish, prepare, sample_jpeg
from deployments.settings import AppSettings

logger = logging.getLogger("ray.serve")

P = ParamSpec("P")
T = TypeVar("T")

# A model's mask for one model-size uint8 (H, W, 3) image: a Serve handle call,
# or an in-process model.
Predict = Callable[[npt.NDArray[np.uint8]], Awaitable[npt.NDArray[np.uint8]]]


@dataclass(frozen=True)
class Job:
    """One cut-out to make: the upload, where to route it, what to do, how to encode."""

    data: bytes
    model: str | None
    options: CutoutOptions
    format: OutputFormat = "png"


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


class Remover:
    """Decode, resize, ask the model, compose, encode: one replica's share of the work."""

    def __init__(self, settings: AppSettings, models: Mapping[str, Predict], threads: int) -> None:
        self.settings = settings
        self.models = dict(models)
        self.specs = {name: spec_for(name) for name in models}
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="stages")

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

    async def remove(self, job: Job) -> Served:
        name = self.model_name(job)
        limits, level = self.settings.limits, self.settings.png_compress_level
        started = time.perf_counter()
        prepared = await self.in_pool(prepare, job.data, self.specs[name], limits)
        inferred = time.perf_counter()
        mask = await self.models[name](prepared.model_input)
        composed = time.perf_counter()
        done = await self.in_pool(finish, prepared.image, mask, job.options, job.format, level)
        ended = time.perf_counter()
        timings = Timings(inferred - started, composed - inferred, ended - composed)
        return Served(done.body, done.width, done.height, name, job.format, timings)

    async def warm_up(self, timeout_s: float = 300) -> None:
        """One photo-sized image through each model's whole path.

        Sets up what a first request would otherwise pay for: the pool's threads,
        Pillow's codecs, the allocator's first large buffers, each model's route.
        Best effort: a model that cannot answer fails its own replica's start.
        """
        data = sample_jpeg(self.settings.limits)
        for name in self.models:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(self.remove(Job(data, name, CutoutOptions())), timeout_s)
            except Exception as exc:
                logger.warning("warm-up through %s failed: %r", name, exc)
            else:
                logger.info("warm through %s in %.2fs", name, time.perf_counter() - started)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
