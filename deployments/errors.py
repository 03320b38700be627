"""The service's error tree: each error carries its HTTP status and a stable code.

They are turned into ``{"error": {"code": ..., "message": ...}}`` responses in one
place (``deployments.responses``). Messages are written for the caller: they never
hold a traceback, a server path or a library version.
"""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the response carries besides the JSON body."""
        return {}


class BadParameter(ServiceError):
    status = 400
    code = "bad_parameter"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class UnknownModel(ServiceError):
    status = 404
    code = "unknown_model"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"


class RequestTimeout(ServiceError):
    status = 408
    code = "request_timeout"


class ClientClosed(ServiceError):
    """The client left before its answer; its work was stopped (nginx's 499).
    Nobody reads the response: the status is for logs and metrics."""

    status = 499
    code = "client_closed"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedImage(ServiceError):
    status = 415
    code = "unsupported_image"


class Overloaded(ServiceError):
    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ModelUnavailable(ServiceError):
    """Raised at start when a model cannot be found or loaded; never per request."""

    status = 503
    code = "model_unavailable"


class ModelLoadFailed(Overloaded):
    """A pooled model could not be loaded on demand; only its own requests fail."""

    code = "model_load_failed"


class InferenceFailed(ServiceError):
    status = 500
    code = "inference_failed"
