"""The Serve layer: an HTTP ingress and one batched model deployment per model.

Thin on purpose: the ingress parses, validates and runs the pure stages in its
thread pool; ``ModelServer`` loads and warms its session in ``__init__``, applies
batch knobs in ``reconfigure`` and groups requests with ``@serve.batch``.
``build_app`` is the application builder named in serve_config.yaml.
"""

import asyncio
import hmac
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import __version__, openapi
from deployments.compose import RemoveOptions
from deployments.encode import MEDIA_TYPES
from deployments.errors import (
    InferenceFailed,
    NotFound,
    Overloaded,
    ServiceError,
    Unauthorized,
    UnknownModel,
)
from deployments.gpu import runtime_for
from deployments.http import query_options, read_body, read_multipart, rembg_options
from deployments.infer import OnnxModel
from deployments.metrics import IngressMetrics, ModelMetrics
from deployments.models import resolve_model_file, spec_for
from deployments.pipeline import Finished, finish, prepare, sample_jpeg
from deployments.settings import AppSettings, BatchSettings, ModelConfig

logger = logging.getLogger("ray.serve")

STATIC = Path(__file__).parent / "static"

T = TypeVar("T")

api = FastAPI(
    title="rembg-serve",
    version=__version__,
    description="Background removal with rembg's models on Ray Serve.",
    docs_url="/docs",
    redoc_url=None,
    openapi_url="/openapi.json",
)


def error_response(error: ServiceError) -> JSONResponse:
    headers = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after_s)
    return JSONResponse(
        {"error": {"code": error.code, "message": error.message}},
        status_code=error.status,
        headers=headers,
    )


@api.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = ServiceError(str(exc.detail))
    error.status, error.code = exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(error)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    logger.info("request validation failed: %s", exc.errors())
    error = ServiceError("the request is malformed")
    error.status, error.code = 400, "bad_parameter"
    return error_response(error)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(ServiceError("internal error"))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _service_error_from(exc: BaseException) -> ServiceError:
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


def _replica_resources() -> tuple[float, list[str]]:
    context = ray.get_runtime_context()
    cpus = float(context.get_assigned_resources().get("CPU", 1.0))
    # Indices, or UUIDs where CUDA_VISIBLE_DEVICES lists UUIDs: kept as strings.
    return cpus, [str(g) for g in ray.get_gpu_ids()]


@serve.deployment(name="Model")
class ModelServer:
    """One model's ONNX Runtime session, warm before ready, batched with Serve."""

    def __init__(self, model: dict[str, Any], num_gpus: float) -> None:
        config = ModelConfig.model_validate(model)
        self.name = config.name
        self.spec = spec_for(config.name)
        self.num_gpus = num_gpus
        self.config = config
        self.batch = BatchSettings()
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
        cpus, gpu_ids = _replica_resources()
        runtime = runtime_for(
            cpus,
            gpu_ids,
            self.num_gpus,
            fp16=self.config.fp16,
            preprocess_in_graph=self.config.preprocess_in_graph,
        )
        resolved = resolve_model_file(self.name, path)
        return OnnxModel(resolved, self.spec, runtime, max_batch_size), resolved

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        batch = BatchSettings.model_validate(user_config)
        started = time.perf_counter()
        source_changed = (batch.model_path, batch.model_version) != (
            self.batch.model_path,
            self.batch.model_version,
        )
        if source_changed:
            # Load and warm the new session while the old one keeps serving, then
            # swap: batches already running finish on the old session.
            model, path = await asyncio.to_thread(
                self._load, batch.model_path or self.config.path, batch.max_batch_size
            )
            self.model, self.path = model, path
            logger.info(
                "model %s: swapped to %s (version %s) in %.2fs",
                self.name,
                path.name,
                batch.model_version,
                time.perf_counter() - started,
            )
        else:
            # Warm any new batch shape before the knob lets a batch that size form.
            await asyncio.to_thread(self.model.warm, batch.max_batch_size)
        logger.info(
            "model %s: warm at batch shapes %s (%.2fs)",
            self.name,
            self.model.buckets,
            time.perf_counter() - started,
        )
        self._predict_batch.set_max_batch_size(batch.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        self.batch = batch
        logger.info("model %s: batch settings %s", self.name, batch.model_dump())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _predict_batch(
        self, items: list[tuple[npt.NDArray[np.uint8], float]]
    ) -> list[npt.NDArray[np.uint8] | ServiceError]:
        started = time.monotonic()
        images = [image for image, _ in items]
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
            self.name, len(images), [started - t for _, t in items], self.last_ok - started
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
        result = await self._predict_batch((image, arrived))
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
            "max_batch_size": self.batch.max_batch_size,
            "batch_wait_timeout_s": self.batch.batch_wait_timeout_s,
            "model_version": self.batch.model_version,
            # Batches this replica formed, by size, since it started.
            "batch_sizes_formed": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "load_s": round(self.model.report.load_s, 3),
            "warmup_s": round(self.model.report.warmup_s, 3),
        }


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP: parse, validate, decode and compose here; the mask comes from a model."""

    # Ray actors (so Serve replicas) may have an async __init__; type checkers object.
    async def __init__(  # type: ignore[misc]
        self, settings: dict[str, Any], models: dict[str, DeploymentHandle]
    ) -> None:
        self.settings = AppSettings.model_validate(settings)
        self.models = models
        self.specs = {name: spec_for(name) for name in models}
        threads = self.settings.ingress_threads or os.cpu_count() or 2
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ingress")
        self.metrics = IngressMetrics()
        self.api_key = self.settings.api_key or (
            os.environ.get(self.settings.api_key_env) if self.settings.api_key_env else None
        )
        if self.settings.api_key_env and not self.api_key:
            raise RuntimeError(f"api_key_env names {self.settings.api_key_env}, which is not set")
        if self.settings.cors_origins:
            # The middleware stack is built on the first request, after __init__.
            api.add_middleware(
                CORSMiddleware,
                allow_origins=self.settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["X-Width", "X-Height", "X-Model"],
            )

        await self._warm_up()

    async def _warm_up(self, timeout_s: float = 300) -> None:
        """One image through each model's whole path before this replica takes traffic.

        The model replicas warm their sessions themselves; this sets up what a
        first request would otherwise pay for here: the pool's threads, Pillow's
        codecs, each handle's router and its connection to the model replicas.
        Best effort: a model that cannot answer fails its own replica's start.
        """
        limits = self.settings.limits
        data = sample_jpeg(limits)
        for name, handle in self.models.items():
            started = time.perf_counter()
            try:
                prepared = await self._in_pool(prepare, data, self.specs[name], limits)
                mask = await asyncio.wait_for(
                    self._predict(handle, prepared.model_input), timeout_s
                )
                await self._in_pool(
                    finish, prepared.image, mask, RemoveOptions(), self.settings.png_compress_level
                )
            except Exception as exc:
                logger.warning("ingress warm-up through %s failed: %r", name, exc)
            else:
                logger.info("ingress warm through %s in %.2fs", name, time.perf_counter() - started)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        bearer = request.headers.get("authorization", "")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise Unauthorized("a valid API key is required (X-API-Key header)")

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))

    async def _remove(self, data: bytes, options: RemoveOptions) -> tuple[Finished, str]:
        name = options.model or self.settings.default_model_name
        try:
            return await self._remove_with(name, data, options), name
        except ServiceError as exc:
            self.metrics.failed(name if name in self.models else "-", exc.code)
            raise

    async def _remove_with(self, name: str, data: bytes, options: RemoveOptions) -> Finished:
        handle = self.models.get(name)
        if handle is None:
            raise UnknownModel(
                f"model {name!r} is not served here; available: {', '.join(self.models)}"
            )
        started = time.perf_counter()
        prepared = await self._in_pool(prepare, data, self.specs[name], self.settings.limits)
        inferred = time.perf_counter()
        mask = await self._predict(handle, prepared.model_input)
        composed = time.perf_counter()
        finished = await self._in_pool(
            finish, prepared.image, mask, options, self.settings.png_compress_level
        )
        done = time.perf_counter()
        pre_s, model_s, post_s = inferred - started, composed - inferred, done - composed
        self.metrics.done(name, pre_s, post_s, len(data), len(finished.body))
        logger.info(
            "image done",
            extra={
                "model": name,
                "width": finished.width,
                "height": finished.height,
                "bytes_in": len(data),
                "bytes_out": len(finished.body),
                "timings_ms": {
                    "pre": round(pre_s * 1000, 1),
                    "model": round(model_s * 1000, 1),
                    "post": round(post_s * 1000, 1),
                },
            },
        )
        return finished

    async def _predict(
        self, handle: DeploymentHandle, image: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.uint8]:
        for attempt in (1, 2):
            try:
                mask: npt.NDArray[np.uint8] = await handle.predict.remote(image)
                return mask
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                # The replica died under this call. Inference is idempotent: send it once
                # more, and the router picks a live replica or waits for the new one.
                if attempt == 2:
                    raise _service_error_from(exc) from exc
            except Exception as exc:
                raise _service_error_from(exc) from exc
        raise AssertionError("unreachable")

    def _image_response(self, result: tuple[Finished, str], options: RemoveOptions) -> Response:
        finished, name = result
        return Response(
            finished.body,
            media_type=MEDIA_TYPES[options.format],
            headers={
                "X-Width": str(finished.width),
                "X-Height": str(finished.height),
                "X-Model": name,
            },
        )

    @api.post(
        "/api/remove",
        summary="Remove the background (rembg-compatible)",
        openapi_extra=openapi.rembg_remove(),
        response_class=Response,
    )
    async def api_remove(self, request: Request) -> Response:
        self._authorize(request)
        upload = await read_multipart(request, self.settings.limits.max_upload_bytes)
        options = rembg_options(upload.fields, dict(request.query_params))
        return self._image_response(await self._remove(upload.data, options), options)

    @api.post(
        "/remove",
        summary="Remove the background (raw body or multipart)",
        openapi_extra=openapi.query_remove(),
        response_class=Response,
    )
    async def remove(self, request: Request) -> Response:
        self._authorize(request)
        options = query_options(dict(request.query_params))
        limit = self.settings.limits.max_upload_bytes
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            data = (await read_multipart(request, limit)).data
        else:
            data = await read_body(request, limit)
        return self._image_response(await self._remove(data, options), options)

    async def _model_infos(self, timeout_s: float = 5.0) -> dict[str, dict[str, Any] | None]:
        async def one(handle: DeploymentHandle) -> dict[str, Any] | None:
            try:
                info: dict[str, Any] = await asyncio.wait_for(handle.info.remote(), timeout_s)
                return info
            except Exception:
                return None

        infos = await asyncio.gather(*(one(h) for h in self.models.values()))
        return dict(zip(self.models, infos, strict=True))

    @api.get(
        "/healthz",
        summary="200 when every configured model is warm",
        responses={503: {"description": "A configured model is not warm"}},
    )
    async def healthz(self) -> JSONResponse:
        infos = await self._model_infos()
        warm = {name: info is not None for name, info in infos.items()}
        status = 200 if all(warm.values()) else 503
        return JSONResponse(
            {"status": "ok" if status == 200 else "unavailable", "models": warm},
            status_code=status,
        )

    @api.get("/models", summary="Configured models, their device and batch settings")
    async def list_models(self) -> dict[str, Any]:
        infos = await self._model_infos()
        return {
            "default": self.settings.default_model_name,
            "models": [
                info if info is not None else {"name": name, "ready": False}
                for name, info in infos.items()
            ],
        }

    @api.get("/", include_in_schema=False)
    async def index(self) -> Response:
        return Response(STATIC.joinpath("index.html").read_bytes(), media_type="text/html")

    @api.get("/{path:path}", include_in_schema=False)
    async def not_found(self, path: str) -> Response:
        raise NotFound(f"no route /{path}")


def _cluster_gpus() -> float:
    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def use_gpu_for(device: str, cluster_gpus: float) -> bool:
    """``auto`` takes the GPU path exactly when the cluster has GPUs.

    A cluster that autoscales GPU nodes from zero shows none until one is up:
    set ``device: gpu`` there, so that replicas ask for GPUs and nodes come.
    """
    if device == "gpu":
        return True
    if device == "cpu":
        return False
    return cluster_gpus > 0


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder for serve_config.yaml's ``import_path``."""
    settings = AppSettings.model_validate(args)
    gpu = use_gpu_for(settings.device, _cluster_gpus())
    actor_options: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if gpu:
        actor_options["num_gpus"] = settings.num_gpus
    # @serve.deployment turned the classes into Deployment objects; mypy sees classes.
    model_server, ingress = cast(serve.Deployment, ModelServer), cast(serve.Deployment, Ingress)
    handles = {}
    for model in settings.models:
        deployment = model_server.options(
            name=f"Model_{model.name}",
            ray_actor_options=actor_options,
            user_config=BatchSettings().model_dump(),
        )
        handles[model.name] = deployment.bind(
            model.model_dump(mode="json"), settings.num_gpus if gpu else 0.0
        )
    logger.info("building app: device %s, models %s", "gpu" if gpu else "cpu", list(handles))
    app: serve.Application = ingress.bind(settings.model_dump(mode="json"), handles)
    return app
