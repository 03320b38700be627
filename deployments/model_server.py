"""The model deployment: one model's ONNX Runtime session, warm before ready, batched.

``ModelServer`` loads and warms its session, applies ``user_config`` live in
``reconfigure`` and groups concurrent requests with ``@serve.batch``: each takes a
model-size uint8 image (decoded and resized by the ingress) and gets its mask.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import ray
from ray import serve

from deployments.errors import ServiceError
from deployments.infer import OnnxModel
from deployments.metrics import ModelMetrics
from deployments.models import resolve_model_file, spec_for
from deployments.runtime import runtime_for
from deployments.settings import LiveModelConfig, ModelConfig

logger = logging.getLogger("ray.serve")

_DEFAULTS = LiveModelConfig()


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


@serve.deployment(name="Model")
class ModelServer:
    """One model's ONNX Runtime session, warm before ready, batched with Serve."""

    def __init__(
        self, model: dict[str, Any], num_gpus: float, resources: Resources | None = None
    ) -> None:
        config = ModelConfig.model_validate(model)
        # In a replica, from Ray; the benchmark runs this class in process and says.
        self.resources = resources or Resources.of_this_replica()
        self.name = config.name
        self.spec = spec_for(config.name)
        self.num_gpus = num_gpus
        self.config = config
        self.live = LiveModelConfig()
        self.last_ok = 0.0
        self.batch_sizes: Counter[int] = Counter()
        self.metrics = ModelMetrics()
        # Set while no batch runs. Requests that arrive during a batch wait here and
        # enter @serve.batch together when it ends, so that the next batch forms when
        # the model is free instead of on the batch timer while it is busy.
        self.model_free = asyncio.Event()
        self.model_free.set()
        # Shape 1 here; reconfigure() warms every shape up to user_config's
        # max_batch_size, and Serve calls it before the replica reports ready.
        self.model, self.path = self._load(config.path, 1)
        logger.info(
            "model loaded: %s on %s (load %.2fs, warm-up %.2fs, shapes %s, batched %s)",
            self.name,
            self.model.provider,
            self.model.report.load_s,
            self.model.report.warmup_s,
            self.model.report.shapes,
            self.model.batchable,
        )

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
        live = LiveModelConfig.model_validate(user_config)
        started = time.perf_counter()
        source_changed = (live.model_path, live.model_version) != (
            self.live.model_path,
            self.live.model_version,
        )
        if source_changed:
            # Load and warm the new session while the old one keeps serving, then
            # swap: batches already running finish on the old session.
            model, path = await asyncio.to_thread(
                self._load, live.model_path or self.config.path, live.max_batch_size
            )
            self.model, self.path = model, path
            logger.info(
                "model %s: swapped to %s (version %s) in %.2fs",
                self.name,
                path.name,
                live.model_version,
                time.perf_counter() - started,
            )
        else:
            # Warm any new batch shape before the knob lets a batch that size form.
            await asyncio.to_thread(self.model.warm, live.max_batch_size)
        logger.info(
            "model %s: warm at batch shapes %s (%.2fs)",
            self.name,
            self.model.buckets,
            time.perf_counter() - started,
        )
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
        started = time.monotonic()
        images = [item.image for item in items]
        self.batch_sizes[len(images)] += 1
        self.model_free.clear()
        try:
            masks = await asyncio.to_thread(self.model.predict, images)
        except ServiceError as exc:
            if len(images) == 1:
                return [exc]
            # Isolate the image that broke the batch: its batchmates still succeed.
            return [await self._predict_one(image) for image in images]
        finally:
            self.model_free.set()
        self.last_ok = time.monotonic()
        self.metrics.batch(
            self.name,
            len(images),
            [started - item.arrived for item in items],
            self.last_ok - started,
        )
        logger.info(
            "batch done",
            extra={
                "model": self.name,
                "batch_size": len(images),
                "inference_ms": round((self.last_ok - started) * 1000, 1),
            },
        )
        return list(masks)

    async def _predict_one(
        self, image: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.uint8] | ServiceError:
        try:
            return (await asyncio.to_thread(self.model.predict, [image]))[0]
        except ServiceError as exc:
            return exc

    async def predict(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """One model-size uint8 (H, W, 3) image -> its uint8 (H, W) mask."""
        arrived = time.monotonic()
        await self.model_free.wait()
        result = await self._predict_batch(Pending(image, arrived))
        if isinstance(result, ServiceError):
            raise result
        mask: npt.NDArray[np.uint8] = result
        return mask

    async def check_health(self) -> None:
        # A batch served recently proves the session runs; otherwise probe it.
        if time.monotonic() - self.last_ok < 30:
            return
        width, height = self.spec.size
        probe = np.zeros((height, width, 3), dtype=np.uint8)
        await asyncio.to_thread(self.model.predict, [probe])
        self.last_ok = time.monotonic()

    async def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.path.name,
            "input_size": list(self.spec.size),
            "device": "gpu" if self.model.runtime.use_gpu else "cpu",
            "provider": self.model.provider,
            "intra_op_threads": self.model.runtime.intra_op_threads,
            "batched": self.model.batchable,
            "batch_shapes": self.model.buckets,
            "max_batch_size": self.live.max_batch_size,
            "batch_wait_timeout_s": self.live.batch_wait_timeout_s,
            "model_version": self.live.model_version,
            # Batches this replica formed, by size, since it started.
            "batch_sizes_formed": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "load_s": round(self.model.report.load_s, 3),
            "warmup_s": round(self.model.report.warmup_s, 3),
        }
