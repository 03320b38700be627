"""The pool deployment: every pooled model from one multiplexed Serve deployment.

Serve routes each request by its model (the ingress calls
``handle.options(multiplexed_model_id=name)``; ``@serve.multiplexed`` tells the
router which replica holds which model, and ``@serve.batch`` splits a batch by
model). Serve's own cache counts models; models here differ 200x in size, so
the memory is ``deployments.pool.ModelPool``'s: a byte budget per replica,
least recently used out, a model with a request in flight kept. Serve's cache
only mirrors it, for routing: its count limit is never reached, and a model the
pool evicts is dropped from it too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from ray import serve

from deployments.errors import InferenceFailed, ModelLoadFailed, ServiceError, UnknownModel
from deployments.infer import OnnxModel
from deployments.memory import DeviceMemory, HostMemory, malloc_trim
from deployments.metrics import ModelMetrics, PoolMetrics
from deployments.model_server import Resources, _replica_id, predict_isolated
from deployments.models import resolve_model_file, spec_for
from deployments.pool import Event, Loaded, LoadFailed, ModelPool
from deployments.preprocess import pack_mask
from deployments.reports import PooledModelInfo, PoolReplicaInfo, wire
from deployments.runtime import RuntimeConfig, runtime_for
from deployments.settings import PoolConfig, PoolLiveConfig

logger = logging.getLogger("ray.serve")

_DEFAULTS = PoolLiveConfig()
# Above any pool's size (PoolConfig allows 64 models): Serve's count never evicts.
_SERVE_CACHE_COUNT = 64
# Where Serve keeps a replica's multiplex cache (ray/serve/api.py, 2.60). Only
# read to drop an evicted model from its routing table; if a Ray release moves
# it, routing merely prefers replicas that once held the model.
_SERVE_CACHE_ATTR = "__serve_multiplex_wrapper"


def load_failed(name: str, exc: LoadFailed) -> ModelLoadFailed:
    """What the caller of a pooled model that could not be loaded gets: a 503."""
    return ModelLoadFailed(
        f"model {name!r} could not be loaded; retry in {exc.retry_after_s:.0f}s",
        retry_after_s=max(1, round(exc.retry_after_s)),
    )


@dataclass(frozen=True)
class PoolMemory:
    """What a pool replica's budget counts, how many bytes of it, and the arena
    cap of each of its sessions on the GPU (None: uncapped, or the CPU)."""

    meter: HostMemory | DeviceMemory
    budget_bytes: int
    arena_bytes: int | None


def pool_memory(
    config: PoolConfig, runtime: RuntimeConfig, device: DeviceMemory | None
) -> PoolMemory:
    """A CPU replica counts host memory (RSS) against ``budget_bytes``. A GPU
    replica counts its memory on ``device`` against ``gpu_budget_bytes`` (None:
    its own arena limit, ``runtime.gpu_mem_limit``; ``budget_bytes`` where that is
    unknown), and caps each session's arena at that budget, never above the
    replica's fraction of the card: its sessions share the fraction. Where NVML
    cannot read the card, a GPU replica counts host memory, as a CPU one."""
    fraction = runtime.gpu_mem_limit
    if not runtime.use_gpu:
        return PoolMemory(HostMemory(), config.budget_bytes, None)
    if device is None or not device.readable():
        logger.warning(
            "pool: NVML cannot read this replica's GPU memory (is nvidia-ml-py installed?): "
            "models are charged host memory (RSS) against budget_bytes"
        )
        cap = _smallest(fraction, config.gpu_budget_bytes)
        return PoolMemory(HostMemory(), config.budget_bytes, cap)
    budget = config.gpu_budget_bytes or fraction
    if budget is None:
        logger.warning("pool: the GPU's memory is unknown: the device budget is budget_bytes")
        budget = config.budget_bytes
    elif fraction is not None and budget > fraction:
        logger.warning(
            "pool: gpu_budget_bytes %d is over this replica's share of the card (%d): "
            "replicas sharing the card may run out of its memory",
            budget,
            fraction,
        )
    return PoolMemory(device, budget, _smallest(fraction, budget))


def _smallest(*limits: int | None) -> int | None:
    return min((n for n in limits if n is not None), default=None)


@dataclass(frozen=True)
class PoolPending:
    """A request waiting in a batch: its model, image and arrival time."""

    model: str
    image: npt.NDArray[np.uint8]
    arrived: float


@serve.deployment(name="Pool", user_config=_DEFAULTS.model_dump(mode="json"))
class PoolServer:
    """Pooled models loaded on demand under a byte budget, batched per model."""

    def __init__(
        self, pool: dict[str, Any], num_gpus: float, resources: Resources | None = None
    ) -> None:
        self.config = PoolConfig.model_validate(pool)
        self.entries = {m.name: m for m in self.config.models}
        self.specs = {m.name: spec_for(m.spec_name) for m in self.config.models}
        self.num_gpus = num_gpus
        # In a replica, from Ray; a test runs this class in process and says.
        self.resources = resources or Resources.of_this_replica()
        runtime = runtime_for(self.resources.cpus, self.resources.gpu_ids, self.num_gpus)
        device = DeviceMemory(self.resources.gpu_ids[0]) if runtime.use_gpu else None
        self.memory = pool_memory(self.config, runtime, device)
        # Every pooled session's arena within the pool's budget on the card.
        self.runtime = replace(runtime, gpu_mem_limit=self.memory.arena_bytes)
        self.replica = _replica_id()
        self.live = _DEFAULTS
        self.metrics = PoolMetrics()
        self.batch_metrics = ModelMetrics()
        self.trim = malloc_trim()
        # Every session run on this one thread, as in a dedicated model's replica;
        # loads run beside it, so that the loaded models keep serving meanwhile.
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.pool: ModelPool[OnnxModel] = ModelPool(
            self.memory.budget_bytes,
            self._load,
            self.entries,
            {m.name: m.bytes for m in self.config.models},
            self.config.retry_failed_s,
            on_event=self._event,
            on_evict=self._evicted,
        )

    def _build(self, name: str, max_batch_size: int) -> Loaded[OnnxModel]:
        entry = self.entries[name]

        path = resolve_model_file(entry.spec_name, entry.path)

        def load() -> OnnxModel:
            return OnnxModel(path, self.specs[name], self.runtime, max_batch_size)

        # The pool runs one load at a time: the growth is this model's (its session,
        # its arena warm at every batch shape), in host memory or on the card. Its
        # weights are a floor: a reading of the whole card (NVML not listing this
        # process) can shrink by what another replica freed meanwhile.
        model, grown = self.memory.meter.charge(load)
        return Loaded(model, max(grown, path.stat().st_size))

    async def _load(self, name: str) -> Loaded[OnnxModel]:
        started = time.perf_counter()
        loaded = await asyncio.to_thread(self._build, name, self.live.max_batch_size)
        report = loaded.model.report
        logger.info(
            "pool: loaded %s in %.2fs (load %.2fs, warm-up %.2fs), +%d MB %s memory",
            name,
            time.perf_counter() - started,
            report.load_s,
            report.warmup_s,
            loaded.bytes // 2**20,
            self.memory.meter.kind,
        )
        return loaded

    def _event(self, event: Event, name: str, seconds: float) -> None:
        self.metrics.event(event, name, seconds, self.pool.used_bytes)
        if event == "failure":
            logger.warning("pool: %s failed to load", name)

    def _evicted(self, name: str) -> None:
        logger.info("pool: evicted %s", name)
        self._forget(name)
        if self.trim is not None:
            # The session's arena went back to the C heap: give it to the system.
            self.trim()

    def _forget(self, name: str) -> None:
        """Drop ``name`` from Serve's cache here, so that the router stops
        preferring this replica for it."""
        cache = getattr(self, _SERVE_CACHE_ATTR, None)
        models = getattr(cache, "models", None)
        if isinstance(models, dict) and models.pop(name, None) is not None:
            # Serve tells the router what this replica holds at its next push.
            cache._push_multiplexed_replica_info = True  # type: ignore[union-attr]

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        live = PoolLiveConfig.model_validate(user_config)
        for name in self.pool.loaded():
            # Warm a new batch shape on the loaded models before a batch that size forms.
            model = self.pool.peek(name)
            await asyncio.get_running_loop().run_in_executor(
                self.runner, model.warm, live.max_batch_size
            )
        self._predict_batch.set_max_batch_size(live.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(live.batch_wait_timeout_s)
        self.live = live

    @serve.multiplexed(max_num_models_per_replica=_SERVE_CACHE_COUNT)
    async def _resident(self, name: str) -> str:
        """Serve's hook for a model its cache here lacks: the router learns at once
        that the model is here (or being loaded here) and sends its requests here.
        The request's lease loads it, so that each request counts one hit or one
        miss."""
        return name

    @serve.batch(
        max_batch_size=_DEFAULTS.max_batch_size,
        batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
    )
    async def _predict_batch(
        self, items: list[PoolPending]
    ) -> list[npt.NDArray[np.uint8] | ServiceError]:
        # Serve splits batches by model id; a batch with two models would still
        # get one session run per model here.
        results: dict[int, npt.NDArray[np.uint8] | ServiceError] = {}
        for name in dict.fromkeys(item.model for item in items):
            group = [i for i, item in enumerate(items) if item.model == name]
            masks = await self._run_group(name, [items[i] for i in group])
            results.update(zip(group, masks, strict=True))
        return [results[i] for i in range(len(items))]

    async def _run_group(
        self, name: str, items: list[PoolPending]
    ) -> list[npt.NDArray[np.uint8] | ServiceError]:
        started = time.monotonic()
        # Every item holds a lease on the model: it is loaded, and stays so.
        model = self.pool.peek(name)
        images = [item.image for item in items]
        # The image that breaks a batch fails alone, as on a dedicated model.
        results = await predict_isolated(name, model.predict, images, self.runner)
        self.batch_metrics.batch(
            name,
            len(images),
            [started - item.arrived for item in items],
            time.monotonic() - started,
        )
        return results

    async def predict_packed(self, image: npt.NDArray[np.uint8]) -> bytes:
        """The deflated mask (``pack_mask``) of the model this request was routed for."""
        name = serve.get_multiplexed_model_id()
        if name not in self.entries:
            raise UnknownModel(f"model {name!r} is not in the pool")
        width, height = self.specs[name].size
        if image.dtype != np.uint8 or image.shape != (height, width, 3):
            raise InferenceFailed(
                f"model {name} takes uint8 ({height}, {width}, 3) images, "
                f"got {image.dtype} {image.shape}"
            )
        arrived = time.monotonic()
        # Through Serve's cache, so that the router knows where the model is.
        await self._resident(name)
        try:
            lease = self.pool.lease(name)
            async with lease:
                result = await self._predict_batch(PoolPending(name, image, arrived))
        except LoadFailed as exc:
            self._forget(name)
            raise load_failed(name, exc) from exc
        if isinstance(result, ServiceError):
            raise result
        return pack_mask(result)

    async def check_health(self) -> None:
        """A pool replica serves while its event loop runs; a model that fails to
        load fails only its own requests."""

    async def info(self) -> dict[str, Any]:
        """This replica's ``PoolReplicaInfo``, as its JSON."""
        models = [
            PooledModelInfo(
                name=slot.name,
                loaded=slot.model is not None,
                bytes=slot.bytes,
                measured_bytes=slot.measured,
                leases=slot.leases,
                loads=slot.loads,
                hits=slot.hits,
                evictions=slot.evictions,
                failures=slot.failures,
                load_s=None if slot.load_s is None else round(slot.load_s, 3),
                error=slot.error,
            )
            for slot in self.pool.slots.values()
        ]
        return wire(
            PoolReplicaInfo(
                replica=self.replica,
                pid=os.getpid(),
                budget_bytes=self.pool.budget_bytes,
                used_bytes=self.pool.used_bytes,
                loaded=self.pool.loaded(),
                models=models,
                budget_memory=self.memory.meter.kind,
            )
        )
