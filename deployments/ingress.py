"""The ingress deployment: HTTP in, the stages in a thread pool, a model call between.

``Ingress`` serves ``deployments.api``'s routes with a ``Remover`` whose models are
the model deployments' handles; it warms that whole path before it reports ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.api import HttpSettings, build_api
from deployments.errors import InferenceFailed, Overloaded, ServiceError
from deployments.metrics import IngressMetrics
from deployments.service import Job, Remover, Served
from deployments.settings import AppSettings

logger = logging.getLogger("ray.serve")


def service_error_from(exc: BaseException) -> ServiceError:
    """Map what a model call raised to what the caller sees; never a traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ServiceError):
        return cause
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded("the model queue is full; retry shortly")
    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
        return Overloaded("a model replica is restarting; retry shortly")
    logger.error("model call failed: %r", exc)
    return InferenceFailed("inference failed")


async def predict_with(
    handle: DeploymentHandle, image: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """The mask from a model deployment; retried once if its replica died under the call."""
    for attempt in (1, 2):
        try:
            mask: npt.NDArray[np.uint8] = await handle.predict.remote(image)
            return mask
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            # Inference is idempotent: send it once more, and the router picks a
            # live replica or waits for the new one.
            if attempt == 2:
                raise service_error_from(exc) from exc
        except Exception as exc:
            raise service_error_from(exc) from exc
    raise AssertionError("unreachable")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP: parse, validate, decode and compose here; the mask comes from a model."""

    # Ray actors (so Serve replicas) may have an async __init__; type checkers object.
    async def __init__(  # type: ignore[misc]
        self, settings: dict[str, Any], models: dict[str, DeploymentHandle]
    ) -> None:
        self.settings = AppSettings.model_validate(settings)
        self.handles = models
        self.metrics = IngressMetrics()
        api_key = self.settings.api_key or (
            os.environ.get(self.settings.api_key_env) if self.settings.api_key_env else None
        )
        if self.settings.api_key_env and not api_key:
            raise RuntimeError(f"api_key_env names {self.settings.api_key_env}, which is not set")
        self.http = HttpSettings(
            max_upload_bytes=self.settings.limits.max_upload_bytes,
            api_key=api_key,
            cors_origins=tuple(self.settings.cors_origins),
        )
        threads = self.settings.ingress_threads or os.cpu_count() or 2
        predictors = {name: partial(predict_with, handle) for name, handle in models.items()}
        self.remover = Remover(self.settings, predictors, threads)
        await self.remover.warm_up()

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve calls this after __init__: the app is built from this replica's settings.
        return build_api(self, self.http)

    def counted(self, error: ServiceError) -> None:
        self.metrics.failed(error.code)

    async def remove(self, job: Job) -> Served:
        self.metrics.routed(self.remover.model_name(job))
        served = await self.remover.remove(job)
        t = served.timings
        self.metrics.done(served.model, t.pre_s, t.post_s, len(job.data), len(served.body))
        logger.info(
            "image done",
            extra={
                "model": served.model,
                "width": served.width,
                "height": served.height,
                "bytes_in": len(job.data),
                "bytes_out": len(served.body),
                "timings_ms": {
                    "pre": round(t.pre_s * 1000, 1),
                    "model": round(t.model_s * 1000, 1),
                    "post": round(t.post_s * 1000, 1),
                },
            },
        )
        return served

    async def _model_infos(self, timeout_s: float = 5.0) -> dict[str, dict[str, Any] | None]:
        async def one(handle: DeploymentHandle) -> dict[str, Any] | None:
            try:
                info: dict[str, Any] = await asyncio.wait_for(handle.info.remote(), timeout_s)
                return info
            except Exception:
                return None

        infos = await asyncio.gather(*(one(h) for h in self.handles.values()))
        return dict(zip(self.handles, infos, strict=True))

    async def health(self) -> dict[str, bool]:
        infos = await self._model_infos()
        return {name: info is not None for name, info in infos.items()}

    async def models(self) -> dict[str, Any]:
        infos = await self._model_infos()
        return {
            "default": self.settings.default_model_name,
            "models": [
                info if info is not None else {"name": name, "ready": False}
                for name, info in infos.items()
            ],
        }
