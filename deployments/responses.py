"""Errors to HTTP responses, in one place.

Every error leaves as ``{"error": {"code": ..., "message": ...}}`` with the status
and headers its ``ServiceError`` carries. Framework errors are translated into the
tree first (an unknown route is ``NotFound``, a query that fails its model is
``BadParameter``), and anything unexpected is logged here and answered as a bare
500: no traceback, path or version ever reaches the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from deployments.errors import BadParameter, MethodNotAllowed, NotFound, ServiceError
from deployments.options import describe

logger = logging.getLogger("ray.serve")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": error.code, "message": error.message}},
        status_code=error.status,
        headers=error.headers,
    )


class FrameworkError(ServiceError):
    """An HTTP error that Starlette or FastAPI raised, not one of the tree's."""

    code = "http_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _from_http(exc: HTTPException) -> ServiceError:
    if exc.status_code == 404:
        return NotFound(str(exc.detail))
    if exc.status_code == 405:
        return MethodNotAllowed(str(exc.detail))
    return FrameworkError(str(exc.detail), exc.status_code)


def install(
    app: FastAPI,
    counted: Callable[[ServiceError], None],
    accepted: Mapping[str, Sequence[str]],
) -> None:
    """Map every error ``app`` raises to a JSON response; ``counted`` sees each one.

    ``accepted`` names, per route path, the parameters an unknown one is told about.
    """

    def answer(error: ServiceError) -> JSONResponse:
        counted(error)
        return error_response(error)

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return answer(exc)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return answer(_from_http(exc))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        names = accepted.get(request.url.path, ())
        return answer(BadParameter(describe(exc.errors(), names)))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return answer(ServiceError("internal error"))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
