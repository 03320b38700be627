"""The model deployment: one model's ONNX Runtime session, warm before ready, batched.

``ModelServer`` loads and warms its session when Serve first hands it its
``user_config`` (before the replica reports ready), applies later ``user_config``
changes live in ``reconfigure`` and groups concurrent requests with
``@serve.batch``: each takes a model-size uint8 image (decoded and resized by the
ingress) and gets its mask. Every session run happens on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import numpy as np
import numpy.typing as npt
import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.admission import ModelFree
from deployments.errors import InferenceFailed, ServiceError
from deployments.infer import OnnxModel
from deployments.metrics import ModelMetrics
from deployments.models import resolve_model_file, spec_for
from deployments.preprocess import pack_mask
from deployments.reports import ModelInfo, ReconfigureError, wire
from deployments.runtime import runtime_for
from deployments.settings import LiveModelConfig, ModelConfig

logger = logging.getLogger("ray.serve")

P = ParamSpec("P")
T = TypeVar("T")

_DEFAULTS = LiveModelConfig()
# A batch served this recently proves the session runs: no health probe needed.
_PROVEN_S = 30.0


@dataclass(frozen=True)
class Pending:
    """A request waiting in a batch: its image and when it reached this replica."""

    image: npt.NDArray[np.uint8]
    arrived: float


@dataclass(frozen=True)
class Resources:
    """What the replica was given: CPUs (its session's threads) and GPU ids."""

    cpus: float
    # Indices, or UUIDs where CUDA_VISIBLE_DEVICES lists UUIDs: kept as strings.
    gpu_ids: tuple[str, ...] = ()

    @classmethod
    def of_this_replica(cls) -> Resources:
        context = ray.get_runtime_context()
        cpus = float(context.get_assigned_resources().get("CPU", 1.0))
        return cls(cpus, tuple(str(g) for g in ray.get_gpu_ids()))


@dataclass(frozen=True)
class Loaded:
    """The session serving now and where it came from."""

    model: OnnxModel
    path: Path
    version: str | None


async def predict_isolated(
    name: str,
    predict: Callable[[list[npt.NDArray[np.uint8]]], Sequence[npt.NDArray[np.uint8]]],
    images: list[npt.NDArray[np.uint8]],
    runner: Executor,
) -> list[npt.NDArray[np.uint8] | ServiceError]:
    """One ``predict`` run of ``images`` on ``runner``; exactly one result (mask or
    error) per image.

    If the batch raises, each image runs again alone, so that the image that broke
    it fails alone (its ``ServiceError``, else ``InferenceFailed``) and its
    batchmates still get their masks. A dedicated model's batch and a pooled one's.
    """
    loop = asyncio.get_running_loop()
    try:
        return list(await loop.run_in_executor(runner, predict, images))
    except Exception as exc:
        logger.warning("model %s: batch of %d failed: %r", name, len(images), exc)
    results: list[npt.NDArray[np.uint8] | ServiceError] = []
    for image in images:
        try:
            results.append((await loop.run_in_executor(runner, predict, [image]))[0])
        except ServiceError as exc:
            results.append(exc)
        except Exception as exc:
            logger.error("model %s: inference failed: %r", name, exc)
            results.append(InferenceFailed("inference failed"))
    return results


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:  # not in a replica (the benchmark's in-process run)
        return "in-process"


# The default user_config makes Serve call reconfigure, where the model loads,
# even for a deployment bound without one (a config's user_config replaces it).
@serve.deployment(name="Model", user_config=LiveModelConfig().model_dump(mode="json"))
class ModelServer:
    """One model's ONNX Runtime session, warm before ready, batched with Serve."""

    def __init__(
        self, model: dict[str, Any], num_gpus: float, resources: Resources | None = None
    ) -> None:
        self.config = ModelConfig.model_validate(model)
        self.name = self.config.name
        self.spec = spec_for(self.name)
        self.num_gpus = num_gpus
        # In a replica, from Ray; the benchmark runs this class in process and says.
        self.resources = resources or Resources.of_this_replica()
        self.live = _DEFAULTS
        # Loaded by the first reconfigure(): Serve calls it with this deployment's
        # user_config right after __init__ and before the replica reports ready,
        # so a (re)started replica loads the file its user_config names, once.
        self.loaded: Loaded | None = None
        self.last_reconfigure_error: ReconfigureError | None = None
        self.replica = _replica_id()
        self.last_ok = 0.0
        self.batch_sizes: Counter[int] = Counter()
        self.metrics = ModelMetrics()
        # Every session run (batches, single retries, health probes, warm-ups of new
        # shapes) on this one thread: runs never overlap on the session, and ONNX
        # Runtime's own intra-op threads are the only parallelism.
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="inference")
        # Requests that arrive during a batch wait here and enter @serve.batch together.
        self.model_free = ModelFree()

    @property
    def model(self) -> OnnxModel:
        if self.loaded is None:
            raise InferenceFailed(f"model {self.name} is not loaded")
        return self.loaded.model

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.runner, lambda: fn(*args, **kwargs))

    def _load(self, path: Path | None, max_batch_size: int) -> tuple[OnnxModel, Path]:
        runtime = runtime_for(
            self.resources.cpus,
            self.resources.gpu_ids,
            self.num_gpus,
            fp16=self.config.fp16,
            preprocess_in_graph=self.config.preprocess_in_graph,
        )
        resolved = resolve_model_file(self.name, path)
        return OnnxModel(resolved, self.spec, runtime, max_batch_size), resolved

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config``; on a live replica a failure keeps what serves now.

        Serve stops a replica whose reconfigure raises, and starts replacements that
        fail the same way: a typo in ``model_path`` would take the model down. So
        once a session serves, a config that cannot be applied (unknown keys, a
        missing or corrupt file, no memory for a second session) is logged, shown
        in ``info()`` as ``last_reconfigure_error`` and in the
        ``rembg_model_reconfigure_failed`` gauge, and otherwise ignored. Only the
        first load, with nothing serving yet, fails the replica's start.

        Serve keeps the failed ``user_config`` all the same: a replica started
        later (a replacement, a scale-up) loads it and fails its start, which
        Serve's status shows. Recovery is a deploy whose ``user_config`` differs
        (the corrected path, the previous one, or a new ``model_version`` once the
        file is fixed in place): Serve calls ``reconfigure`` only on a change.
        """
        if self.loaded is None:
            await self._apply(LiveModelConfig.model_validate(user_config))
            self.metrics.reconfigured(self.name, ok=True)
            return
        try:
            await self._apply(LiveModelConfig.model_validate(user_config))
        except Exception as exc:
            # The full error (paths included) goes to the replica's log; /models is
            # public and shows only its kind.
            logger.exception("model %s: reconfigure failed; serving as before", self.name)
            self.refused(exc, user_config.get("model_version"))
        else:
            self.last_reconfigure_error = None
            self.metrics.reconfigured(self.name, ok=True)

    def refused(self, exc: Exception, version: object = None) -> None:
        """Record a live config not applied (``/models``' ``last_reconfigure_error``,
        the ``rembg_model_reconfigure_failed`` gauge); what serves stays."""
        self.last_reconfigure_error = ReconfigureError(
            at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            error=type(exc).__name__,
            model_version=None if version is None else str(version),
        )
        self.metrics.reconfigured(self.name, ok=False)

    async def _apply(self, live: LiveModelConfig) -> None:
        started = time.perf_counter()
        loaded = self.loaded
        if loaded is None or (live.model_path, live.model_version) != (
            self.live.model_path,
            self.live.model_version,
        ):
            source = live.model_path or self.config.path
            if loaded is None:
                # Nothing serves yet: load and warm on the inference thread itself.
                model, path = await self._run(self._load, source, live.max_batch_size)
            else:
                # Load and warm the new session beside the old one, which keeps
                # serving on the inference thread; then swap: batches already
                # running finish on the old session.
                model, path = await asyncio.to_thread(self._load, source, live.max_batch_size)
            self.loaded = Loaded(model, path, live.model_version)
            # Its warm-up ran the session at every shape just now: proof enough for
            # the health check Serve runs before the replica counts as ready, which
            # would otherwise run one more image (0.3-0.6 s of a new replica's start).
            self.last_ok = time.monotonic()
            logger.info(
                "model %s: %s %s (version %s) on %s in %.2fs (load %.2fs, warm-up %.2fs, "
                "shapes %s, batched %s)",
                self.name,
                "loaded" if loaded is None else "swapped to",
                path.name,
                live.model_version,
                model.provider,
                time.perf_counter() - started,
                model.report.load_s,
                model.report.warmup_s,
                model.report.shapes,
                model.batchable,
            )
        else:
            # Warm any new batch shape before the knob lets a batch that size form.
            await self._run(loaded.model.warm, live.max_batch_size)
        self._predict_batch.set_max_batch_size(live.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(live.batch_wait_timeout_s)
        self.live = live
        logger.info("model %s: live config %s", self.name, live.model_dump(mode="json"))

    @serve.batch(
        max_batch_size=_DEFAULTS.max_batch_size,
        batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
    )
    async def _predict_batch(
        self, items: list[Pending]
    ) -> list[npt.NDArray[np.uint8] | ServiceError]:
        return await self.run_batch(items)

    async def run_batch(self, items: list[Pending]) -> list[npt.NDArray[np.uint8] | ServiceError]:
        """One session run for the batch; exactly one result (mask or error) per item.

        What ``@serve.batch`` calls with the batch it formed; a plain method so that
        it runs (and is tested) without a replica, which Serve's batch queue needs.
        """
        started = time.monotonic()
        images = [item.image for item in items]
        self.batch_sizes[len(images)] += 1
        with self.model_free.batch():
            # self.model read at each run, as a swap may land between them.
            results = await predict_isolated(
                self.name, lambda batch: self.model.predict(batch), images, self.runner
            )
        self.last_ok = time.monotonic()
        self.metrics.batch(
            self.name,
            len(images),
            [started - item.arrived for item in items],
            self.last_ok - started,
        )
        # DEBUG: a line per batch cost ~0.2 ms of CPU a request at INFO (2-core
        # machine); batch sizes and times are in the metrics (rembg_batch_size,
        # rembg_inference_seconds). A deployment's logging_config log_level: DEBUG
        # brings the line back.
        logger.debug(
            "batch done",
            extra={
                "model": self.name,
                "batch_size": len(images),
                "inference_ms": round((self.last_ok - started) * 1000, 1),
            },
        )
        return results

    async def predict(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """One model-size uint8 (H, W, 3) image -> its uint8 (H, W) mask."""
        width, height = self.spec.size
        if image.dtype != np.uint8 or image.shape != (height, width, 3):
            # Checked here, before the batch: a malformed input never reaches its batchmates.
            raise InferenceFailed(
                f"model {self.name} takes uint8 ({height}, {width}, 3) images, "
                f"got {image.dtype} {image.shape}"
            )
        arrived = time.monotonic()
        await self.model_free.wait()
        result = await self._predict_batch(Pending(image, arrived))
        if isinstance(result, ServiceError):
            raise result
        mask: npt.NDArray[np.uint8] = result
        return mask

    async def predict_packed(self, image: npt.NDArray[np.uint8]) -> bytes:
        """``predict``, its mask deflated (``pack_mask``): what the ingress calls
        through its handle, so that the answer rides inline instead of through
        the object store."""
        return pack_mask(await self.predict(image))

    async def check_health(self) -> None:
        """Healthy while it can serve: loaded, and busy or proven by a recent batch.

        A batch running now is proof enough (and a probe would only queue behind
        it); an idle replica with no batch for ``_PROVEN_S`` runs a probe image.
        """
        model = self.model
        if not self.model_free.is_set() or time.monotonic() - self.last_ok < _PROVEN_S:
            return
        width, height = self.spec.size
        await self._run(model.predict, [np.zeros((height, width, 3), dtype=np.uint8)])
        self.last_ok = time.monotonic()

    async def info(self) -> dict[str, Any]:
        """This replica's ``ModelInfo``, as its JSON (``reports.wire``).

        A plain dict crosses Ray rather than the pydantic object: the ingress
        validates it into its own ``ModelInfo``, so an ingress and a model replica
        of different versions (mid rolling update) still understand each other,
        where an unpickled model of another version's class would not be checked.
        """
        loaded = self.loaded
        if loaded is None:
            return wire(ModelInfo(name=self.name, ready=False, replica=self.replica))
        model = loaded.model
        return wire(
            ModelInfo(
                name=self.name,
                ready=True,
                replica=self.replica,
                pid=os.getpid(),
                file=loaded.path.name,
                model_version=loaded.version,
                input_size=self.spec.size,
                device="gpu" if model.runtime.use_gpu else "cpu",
                provider=model.provider,
                intra_op_threads=model.runtime.intra_op_threads,
                batched=model.batchable,
                batch_shapes=model.buckets,
                max_batch_size=self.live.max_batch_size,
                batch_wait_timeout_s=self.live.batch_wait_timeout_s,
                batch_sizes_formed={str(k): v for k, v in sorted(self.batch_sizes.items())},
                busy=not self.model_free.is_set(),
                load_s=round(model.report.load_s, 3),
                warmup_s=round(model.report.warmup_s, 3),
                last_reconfigure_error=self.last_reconfigure_error,
            )
        )


def in_process(model: ModelConfig, num_gpus: float, cpus: float) -> ModelServer:
    """``model``'s server as a plain object of the calling replica (the ingress, with
    ``models_in_ingress``): the same load, warm-up, ``@serve.batch``, live config and
    reports as a deployment's replica, without the hop. It loads in ``reconfigure``.

    ``cpus`` and ``num_gpus`` are this model's share of the replica (which reserves
    them once per model it holds): its ONNX Runtime threads and its GPU memory cap."""
    resources = Resources(cpus, tuple(str(g) for g in ray.get_gpu_ids()))
    server: ModelServer = cast(Any, ModelServer).func_or_class(
        model.model_dump(mode="json"), num_gpus, resources
    )
    return server
