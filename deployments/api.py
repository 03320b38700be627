"""The HTTP surface: routes, the options they take, and the OpenAPI document.

``build_api`` makes the FastAPI app for any ``RemoveService`` (the Serve ingress,
or an in-process one in tests). Routes only parse, authorize and answer: the
work is the service's. Imports no Ray.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import weakref
from collections.abc import Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from deployments import __version__, responses
from deployments.encode import MEDIA_TYPES
from deployments.errors import (
    BadParameter,
    ClientClosed,
    NotFound,
    RequestTimeout,
    ServiceError,
    Unauthorized,
)
from deployments.options import (
    OptionsError,
    OutputFormat,
    RembgForm,
    RemoveQuery,
    field_names,
    parse,
)
from deployments.reports import HealthReport, ModelsReport
from deployments.service import Job, Served
from deployments.wire import read_body, read_multipart

STATIC = Path(__file__).parent / "static"
T = TypeVar("T")
logger = logging.getLogger("ray.serve")


class RemoveService(Protocol):
    """What the routes need from the service behind them."""

    def reading(
        self, refining: bool, model: str | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Entered to read a request's body (``refining``: it asks for matting or
        decontamination; ``model``: the one it names, where known before the
        body); raises ``Overloaded`` (503) if it would be refused now."""
        ...

    async def remove(self, job: Job) -> Served:
        """The cut-out; admitted here, once the body is read (``Overloaded``, 503,
        when it cannot be served in time)."""
        ...

    async def health(self) -> dict[str, bool]:
        """Per configured model: can it serve now (busy counts as yes)."""
        ...

    async def models(self) -> ModelsReport: ...

    def counted(self, error: ServiceError) -> None:
        """Called for every error answered (the error metric)."""
        ...


@dataclass(frozen=True)
class HttpSettings:
    max_upload_bytes: int
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    # A body not received whole in this many seconds gets a 408 (None: no limit).
    body_read_timeout_s: float | None = None
    # Work on a read body not done in this many seconds is stopped: 408 (None: no limit).
    work_timeout_s: float | None = None


async def _client_left(request: Request) -> None:
    """Returns once the client has disconnected (call it after the body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_when_client_leaves(
    request: Request, task: weakref.ref[asyncio.Task[Any]], left: asyncio.Event
) -> None:
    await _client_left(request)
    left.set()
    leaving = task()
    if leaving is not None:
        leaving.cancel()


def _this_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None
    return task


async def bounded(request: Request, work: Awaitable[T], timeout_s: float | None) -> T:
    """``work``, stopped if the client leaves (``ClientClosed``) or if it has not
    ended within ``timeout_s`` (``RequestTimeout``, 408, as Serve's own timeout).

    The app's own bounds: Serve's proxy drops its request timeout and stops
    cancelling on disconnect for any client that sends
    ``x-request-timeout-seconds: 0`` or ``x-request-disconnect-disabled: ?1``, and
    it acts on them before the app sees the request. ``work`` runs in this task,
    so what it sets in context variables (the metrics' model tag) stays visible.

    Nothing this frame keeps refers to this task: a cancelled task keeps its
    CancelledError (a failed one its error), whose traceback holds this frame and
    the work's. A reference from there back to the task is a cycle, and all that
    the work's frames hold (the ingress's decoded images, their pixel budget
    already given back) stays in memory until a full garbage collection, which a
    busy replica may not run for minutes. So the watcher holds the task weakly,
    and the timeout, which holds it too, is dropped on the way out.
    """
    left = asyncio.Event()
    watcher = asyncio.ensure_future(
        _cancel_when_client_leaves(request, weakref.ref(_this_task()), left)
    )
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            return await work
    except TimeoutError:
        if not deadline.expired():
            raise
        logger.warning("work cancelled after %gs", timeout_s)
        raise RequestTimeout(f"the request did not finish within {timeout_s:g}s") from None
    except asyncio.CancelledError:
        if not left.is_set():
            raise  # Serve's own cancellation
        _this_task().uncancel()
        logger.info("client left: work cancelled")
        raise ClientClosed("the client closed the connection; its work was stopped") from None
    finally:
        watcher.cancel()
        del deadline


def api_key_from(key: str | None, env_name: str | None, environ: Mapping[str, str]) -> str | None:
    """The API key: ``key`` if set, else the variable ``env_name`` names, stripped
    (a secret file's trailing newline would lock every client out). ``RuntimeError``
    if that variable is unset, empty or shorter than 16 characters, as a key in
    the config must be: the replica refuses to start rather than serve unguarded."""
    if key is not None or env_name is None:
        return key
    from_env = environ.get(env_name, "").strip()
    if len(from_env) < 16:
        raise RuntimeError(
            f"api_key_env names {env_name}, which is unset, empty or shorter than 16 characters"
        )
    return from_env


_IMAGE_HEADERS = {
    "X-Width": {"schema": {"type": "integer"}},
    "X-Height": {"schema": {"type": "integer"}},
    "X-Model": {"schema": {"type": "string"}},
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": responses.ErrorBody, "description": "A JSON error"}
    for status in (400, 401, 404, 408, 413, 415, 500)
}
_ERRORS[503] = {
    "model": responses.ErrorBody,
    "description": "Overloaded: retry after the Retry-After header's seconds",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
}


def _image_responses(formats: tuple[OutputFormat, ...]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "The cut-out (or the mask with only_mask)",
            "headers": _IMAGE_HEADERS,
            "content": {MEDIA_TYPES[f]: _BINARY for f in formats},
        },
        **_ERRORS,
    }


def _rembg_form_schema() -> dict[str, Any]:
    schema = RembgForm.model_json_schema(by_alias=True)
    properties = {"file": {"type": "string", "format": "binary"}, **schema["properties"]}
    return {"type": "object", "required": ["file"], "properties": properties}


def build_api(service: RemoveService, settings: HttpSettings) -> FastAPI:
    """The FastAPI app that serves ``service``."""
    api = FastAPI(
        title="rembg-serve",
        version=__version__,
        description="Background removal with rembg's models on Ray Serve.",
        # No Swagger UI page: FastAPI's loads its scripts from a CDN, and the
        # service needs no internet. The document is served below, keyed as the API.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    responses.install(
        api,
        service.counted,
        accepted={"/remove": field_names(RemoveQuery), "/api/remove": field_names(RembgForm)},
    )
    if settings.cors_origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Width", "X-Height", "X-Model"],
        )
    limit, read_s = settings.max_upload_bytes, settings.body_read_timeout_s
    work_s = settings.work_timeout_s

    async def authorize(request: Request) -> None:
        """The API key, when one is set; checked before the body is read."""
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        bearer = request.headers.get("authorization", "")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise Unauthorized("a valid API key is required (X-API-Key header)")

    def image(served: Served) -> Response:
        return Response(
            served.body,
            media_type=MEDIA_TYPES[served.format],
            headers={
                "X-Width": str(served.width),
                "X-Height": str(served.height),
                "X-Model": served.model,
            },
        )

    @api.post(
        "/api/remove",
        summary="Remove the background (rembg-compatible)",
        dependencies=[Depends(authorize)],
        response_class=Response,
        responses=_image_responses(("png",)),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": _rembg_form_schema()}},
            }
        },
    )
    async def api_remove(
        request: Request,
        bgc: Annotated[
            str | None,
            Query(description="Background colour: R,G,B,A (0-255) or #RRGGBBAA"),
        ] = None,
    ) -> Response:
        # Matting or not, its form says: in the body.
        async with service.reading(refining=False):
            upload = await read_multipart(request, limit, read_s)
        fields = {k: v for k, v in upload.fields.items() if k != "file"}
        if bgc is not None:
            fields["bgc"] = bgc
        if "extras" in request.query_params:
            fields["extras"] = request.query_params["extras"]
        try:
            form = parse(RembgForm, fields)
        except OptionsError as exc:
            raise BadParameter(str(exc)) from None
        # rembg's contract: rembg's pixels, whatever the service's fidelity setting.
        job = Job(upload.data, form.model, form.cutout(), fidelity="exact")
        return image(await bounded(request, service.remove(job), work_s))

    @api.post(
        "/remove",
        summary="Remove the background (raw body or multipart)",
        dependencies=[Depends(authorize)],
        response_class=Response,
        responses=_image_responses(("png", "webp")),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/*": _BINARY,
                    "application/octet-stream": _BINARY,
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    },
                },
            }
        },
    )
    async def remove(request: Request, query: Annotated[RemoveQuery, Query()]) -> Response:
        options = query.cutout()
        # Refused before the body is read when busy; admitted once it is read.
        refining = options.alpha_matting or options.decontaminate
        async with service.reading(refining, query.model):
            if request.headers.get("content-type", "").lower().startswith("multipart/"):
                data = (await read_multipart(request, limit, read_s)).data
            else:
                data = await read_body(request, limit, read_s)
        job = Job(data, query.model, options, query.format, query.fidelity)
        return image(await bounded(request, service.remove(job), work_s))

    @api.get(
        "/healthz",
        summary="200 while every configured model can serve (busy included)",
        response_model=HealthReport,
        responses={503: {"model": HealthReport, "description": "A configured model cannot serve"}},
    )
    async def healthz(response: Response) -> HealthReport:
        models = await service.health()
        ok = all(models.values())
        response.status_code = 200 if ok else 503
        return HealthReport(status="ok" if ok else "unavailable", models=models)

    @api.get(
        "/models",
        summary="Configured models, their device and batch settings",
        # Replica ids, pid and model files: for those who hold the key, if one is set.
        dependencies=[Depends(authorize)],
        response_model=ModelsReport,
        responses={401: _ERRORS[401]},
        # Keys a model's state does not have stay out (see deployments.reports).
        response_model_exclude_unset=True,
    )
    async def list_models() -> ModelsReport:
        return await service.models()

    @api.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
    async def openapi() -> dict[str, Any]:
        return api.openapi()

    @api.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(STATIC.joinpath("index.html").read_bytes(), media_type="text/html")

    @api.get("/{path:path}", include_in_schema=False)
    async def not_found(path: str) -> Response:
        raise NotFound(f"no route /{path}")

    return api
