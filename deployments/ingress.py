"""The ingress deployment: HTTP in, the stages in a thread pool, a model call between.

``Ingress`` serves ``deployments.api``'s routes with a ``Remover`` whose models are
the model deployments' handles; it warms that whole path before it reports ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeStatus

from deployments.admission import images_in_flight
from deployments.api import HttpSettings, api_key_from, build_api
from deployments.errors import InferenceFailed, Overloaded, ServiceError
from deployments.metrics import IngressMetrics
from deployments.model_server import ModelServer, in_process
from deployments.models import spec_for
from deployments.preprocess import unpack_mask
from deployments.reports import ModelInfo, ModelsReport, PoolReplicaInfo, PoolReport, RefineState
from deployments.service import Job, Predict, Remover, RemoverConfig, Served
from deployments.settings import (
    POOL_DEPLOYMENT,
    AppSettings,
    deployment_name,
    ingress_model_parts,
)

logger = logging.getLogger("ray.serve")
# A record's ``extra`` that keeps it out of the console of `serve run` (Serve's
# stderr handler drops it: Ray's ``log_to_stderr_filter``) and in the replica's log
# file. The file's JSON line then carries ``"log_to_stderr": false`` too.
FILE_ONLY: dict[str, bool] = {"log_to_stderr": False}

# How old Serve's status may be when /healthz answers from it, and how long a
# probe waits for it (then it reads as down: 503).
_STATUS_S = 1.0
_STATUS_TIMEOUT_S = 2.0

T = TypeVar("T")


class SharedCall(Generic[T]):
    """``fn()``'s answer, at most ``max_age_s`` old: one call at a time, on a thread,
    shared by concurrent callers. Each caller waits at most ``timeout_s`` for it
    (``TimeoutError``); a caller that leaves (a probe that disconnects) never
    cancels the call the others wait on."""

    def __init__(self, fn: Callable[[], T], max_age_s: float, timeout_s: float) -> None:
        self.fn, self.max_age_s, self.timeout_s = fn, max_age_s, timeout_s
        self._value: tuple[float, T] | None = None
        self._task: asyncio.Future[T] | None = None

    async def get(self) -> T:
        if self._value is not None and time.monotonic() - self._value[0] <= self.max_age_s:
            return self._value[1]
        if self._task is None:
            self._task = asyncio.ensure_future(asyncio.to_thread(self.fn))
            self._task.add_done_callback(self._done)
        return await asyncio.wait_for(asyncio.shield(self._task), self.timeout_s)

    def _done(self, task: asyncio.Future[T]) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is None:
            self._value = (time.monotonic(), task.result())


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
            packed: bytes = await handle.predict_packed.remote(image)
            return unpack_mask(packed, image.shape[:2])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            # Inference is idempotent: send it once more, and the router picks a
            # live replica or waits for the new one.
            if attempt == 2:
                raise service_error_from(exc) from exc
        except Exception as exc:
            raise service_error_from(exc) from exc
    raise AssertionError("unreachable")


def node_cpus() -> int:
    """The CPUs Ray counts on this replica's node: a container's limit where Ray
    runs in one (KubeRay sets it from the pod's), not the host's cores that
    ``os.cpu_count()`` sees. The ingress reserves no CPU of its own (it shares the
    node with the model), so its pool is sized from the node's."""
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here and node.get("Resources", {}).get("CPU"):
            return max(1, int(node["Resources"]["CPU"]))
    return os.cpu_count() or 2


def serving_cap() -> int | None:
    """The image requests this replica takes at once, from Serve's cap for it
    (``max_ongoing_requests``, a field its replica context carries). Read per
    request: Serve changes it in place when the config does.

    Ray has no public accessor for it (its own @serve.batch reads this field too),
    and build_app cannot pass it in: a serve config's `deployments:` options are
    applied after the app's init args are bound."""
    deployment = getattr(serve.get_replica_context(), "_deployment_config", None)
    serving = getattr(deployment, "max_ongoing_requests", None)
    return images_in_flight(serving) if serving else None


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP: parse, validate, decode and compose here; the mask comes from a model."""

    # Ray actors (so Serve replicas) may have an async __init__; type checkers object.
    async def __init__(  # type: ignore[misc]
        self,
        settings: dict[str, Any],
        models: dict[str, DeploymentHandle],
        pool: DeploymentHandle | None = None,
        num_gpus: float = 0.0,
    ) -> None:
        self.settings = AppSettings.model_validate(settings)
        self.handles = models
        # models_in_ingress: the models' servers, here; they load in reconfigure().
        self.local: dict[str, ModelServer] = {}
        if self.settings.models_in_ingress:
            cpus = self.settings.num_cpus
            self.local = {m.name: in_process(m, num_gpus, cpus) for m in self.settings.models}
        self.pool = pool
        self.metrics = IngressMetrics()
        api_key = api_key_from(self.settings.api_key, self.settings.api_key_env, os.environ)
        self.http = HttpSettings(
            max_upload_bytes=self.settings.limits.max_upload_bytes,
            api_key=api_key,
            cors_origins=tuple(self.settings.cors_origins),
            body_read_timeout_s=self.settings.body_read_timeout_s,
            work_timeout_s=self.settings.work_timeout_s,
        )
        threads = self.settings.ingress_threads or node_cpus()
        predictors: dict[str, Predict] = {
            name: partial(predict_with, handle) for name, handle in models.items()
        }
        predictors.update({name: server.predict for name, server in self.local.items()})
        pooled = self.settings.pool.models if self.settings.pool else []
        if pool is not None:
            for entry in pooled:
                # Serve routes by the model id to a pool replica that holds the model.
                routed = pool.options(multiplexed_model_id=entry.name)
                predictors[entry.name] = partial(predict_with, routed)
        self.remover = Remover(
            RemoverConfig.of(self.settings),
            predictors,
            threads,
            serving_cap(),
            specs={m.name: spec_for(m.spec_name) for m in pooled},
            # Pooled models load on demand: warming each here would load them all.
            lazy=frozenset(m.name for m in pooled),
        )
        self.app_name = serve.get_replica_context().app_name
        self._serve_status: SharedCall[ServeStatus] = SharedCall(
            serve.status, _STATUS_S, _STATUS_TIMEOUT_S
        )
        self._infos: dict[str, ModelInfo] = {}
        self.warmed = False
        if not self.local:
            await self._warm_up()

    async def _warm_up(self) -> None:
        await self.remover.warm_up()
        if self.settings.refine_warmup == "startup":
            await self.remover.warm_refine(background=False)
        elif self.settings.refine_warmup == "background":
            self._refine_warmup = asyncio.get_running_loop().create_task(self.remover.warm_refine())
        self.warmed = True

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """With ``models_in_ingress``: ``{models: {<name>: <a model's user_config>}}``,
        each part applied by its model's server as a model replica applies its own (on
        a live replica a failure keeps what serves and shows in ``/models``); a model
        not named gets the defaults. The first call loads the models, then warms the
        whole path, before the replica reports ready.

        A user_config of another shape, or naming a model not served here, fails the
        replica's start; on a live replica it changes nothing, and every model here
        shows it as its ``last_reconfigure_error``."""
        if not self.local:
            logger.warning("Ingress: user_config ignored; the models run in their own deployments")
            return
        try:
            parts = ingress_model_parts(user_config, set(self.local))
        except ValueError as exc:
            if not self.warmed:
                raise
            logger.exception("Ingress: user_config refused; every model serves as before")
            for server in self.local.values():
                server.refused(exc)
            return
        for name, server in self.local.items():
            await server.reconfigure(parts.get(name, {}))
        if not self.warmed:
            await self._warm_up()

    async def check_health(self) -> None:
        """With ``models_in_ingress``: each model's own check (loaded; busy or proven)."""
        for server in self.local.values():
            await server.check_health()

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve calls this after __init__: the app is built from this replica's settings.
        return build_api(self, self.http)

    def counted(self, error: ServiceError) -> None:
        self.metrics.failed(error.code)

    async def remove(self, job: Job) -> Served:
        self.metrics.routed(self.remover.model_name(job))
        served = await self.remover.serve(job)
        t = served.timings
        self.metrics.done(served.model, t.pre_s, t.post_s, len(job.data), len(served.body))
        logger.info(
            "image done",
            extra={
                # In the replica's JSON log file only: the console keeps Serve's
                # one access line a request (FILE_ONLY).
                **FILE_ONLY,
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

    def reading(
        self, refining: bool, model: str | None = None
    ) -> AbstractAsyncContextManager[None]:
        self.remover.admission.max_in_flight = serving_cap()
        return self.remover.reading(refining, model)

    async def health(self) -> dict[str, bool]:
        """Per model: does at least one of its replicas run, in Serve's own status.

        Asked of Serve's controller, not of the model replicas: a probe never waits
        in a busy model's queue, so busy reads as up and only a model with no
        running replica reads as down.
        """
        # Models in this replica: up once loaded (this replica answers for them).
        here = {name: s.loaded is not None for name, s in self.local.items()}
        try:
            app = (await self._serve_status.get()).applications[self.app_name]
        except Exception as exc:
            logger.warning("serve status unavailable: %r", exc)
            return dict.fromkeys([*self.handles, *self.settings.pooled_names], False) | here

        def running(deployment_name: str) -> bool:
            deployment = app.deployments.get(deployment_name)
            return bool(deployment and deployment.replica_states.get("RUNNING", 0) > 0)

        up = {name: running(deployment_name(name)) for name in self.handles}
        pool_up = running(POOL_DEPLOYMENT)
        up.update(dict.fromkeys(self.settings.pooled_names, pool_up))
        return up | here

    async def models(self, timeout_s: float = 2.0) -> ModelsReport:
        """What each model's replica says of itself, or its last answer while it is
        too busy to say (marked ``stale``), or that it is not ready."""

        async def one(name: str, handle: DeploymentHandle) -> ModelInfo:
            try:
                info = ModelInfo.model_validate(
                    await asyncio.wait_for(handle.info.remote(), timeout_s)
                )
            except Exception as exc:
                last = self._infos.get(name)
                if last is None:
                    return ModelInfo(name=name, ready=False, reason=type(exc).__name__)
                return last.model_copy(update={"stale": True})
            self._infos[name] = info
            return info

        infos = await asyncio.gather(*(one(n, h) for n, h in self.handles.items()))
        infos += [ModelInfo.model_validate(await s.info()) for s in self.local.values()]
        report = ModelsReport(
            default=self.settings.default_model_name,
            models=list(infos),
            refine=RefineState.model_validate(self.remover.refine_state),
        )
        if self.pool is None:
            return report
        return report.model_copy(update={"pool": await self._pool_report(self.pool, timeout_s)})

    async def _pool_report(self, pool: DeploymentHandle, timeout_s: float) -> PoolReport:
        """What one pool replica holds (asked with no model id: any replica answers)."""
        names = self.settings.pooled_names
        try:
            info = await asyncio.wait_for(pool.info.remote(), timeout_s)
        except Exception as exc:
            return PoolReport(models=names, reason=type(exc).__name__)
        return PoolReport(models=names, replica=PoolReplicaInfo.model_validate(info))
