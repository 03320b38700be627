"""HTTP request parsing: bodies read within limits, options validated.

Everything here turns wire values into typed values or raises a ``ServiceError``;
it imports Starlette but no Ray, so it is tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message, Receive

from deployments.compose import RemoveOptions
from deployments.errors import BadParameter, PayloadTooLarge

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off", ""}


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadParameter(f"{name} must be a boolean (true/false), got {value!r}")


def parse_int(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise BadParameter(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise BadParameter(f"{name} must be between {low} and {high}, got {number}")
    return number


def parse_color(name: str, value: str) -> tuple[int, int, int, int]:
    """``R,G,B,A`` (rembg's form; ``R,G,B`` means opaque) or ``#RRGGBB[AA]``."""
    text = value.strip()
    try:
        if text.startswith("#") and len(text) in (7, 9):
            parts = [int(text[i : i + 2], 16) for i in range(1, len(text), 2)]
        else:
            parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 3:
        parts.append(255)
    if len(parts) != 4 or not all(0 <= p <= 255 for p in parts):
        raise BadParameter(
            f"{name} must be 'R,G,B,A' with values 0-255 or '#RRGGBBAA', got {value!r}"
        )
    return (parts[0], parts[1], parts[2], parts[3])


# rembg's field name -> (our option name, kind). Thresholds as rembg bounds them.
_REMBG_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("model", "str"),
    "a": ("alpha_matting", "bool"),
    "af": ("foreground_threshold", "byte"),
    "ab": ("background_threshold", "byte"),
    "ae": ("erode_size", "erode"),
    "om": ("only_mask", "bool"),
    "ppm": ("post_process_mask", "bool"),
    "dc": ("decontaminate", "bool"),
    "bgc": ("bgcolor", "color"),
}

_QUERY_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("model", "str"),
    "only_mask": ("only_mask", "bool"),
    "bgcolor": ("bgcolor", "color"),
    "alpha_matting": ("alpha_matting", "bool"),
    "alpha_matting_foreground_threshold": ("foreground_threshold", "byte"),
    "alpha_matting_background_threshold": ("background_threshold", "byte"),
    "alpha_matting_erode_size": ("erode_size", "erode"),
    "post_process_mask": ("post_process_mask", "bool"),
    "decontaminate": ("decontaminate", "bool"),
    "format": ("format", "format"),
}

MAX_ERODE_SIZE = 100


def _convert(name: str, kind: str, value: str) -> Any:
    if kind == "bool":
        return parse_bool(name, value)
    if kind == "byte":
        return parse_int(name, value, 0, 255)
    if kind == "erode":
        return parse_int(name, value, 0, MAX_ERODE_SIZE)
    if kind == "color":
        return parse_color(name, value) if value.strip() else None
    if kind == "format":
        fmt = value.strip().lower()
        if fmt not in ("png", "webp"):
            raise BadParameter(f"format must be png or webp, got {value!r}")
        return fmt
    text = value.strip()
    return text or None


def _options(values: Mapping[str, str], fields: Mapping[str, tuple[str, str]]) -> RemoveOptions:
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise BadParameter(
            f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(fields)}"
        )
    kwargs = {
        option: _convert(name, kind, values[name])
        for name, (option, kind) in fields.items()
        if name in values
    }
    return RemoveOptions(**kwargs)


def rembg_options(form: Mapping[str, str], query: Mapping[str, str]) -> RemoveOptions:
    """Options of rembg's ``POST /api/remove``: form fields, plus ``bgc`` in the query.

    rembg's ``extras`` (JSON passed to its session factory, model paths included)
    is refused: no server-side path is ever taken from a request.
    """
    if "extras" in form or "extras" in query:
        raise BadParameter("extras is not supported by this server")
    merged = {k: v for k, v in form.items() if k != "file"}
    if "bgc" in query:
        merged["bgc"] = query["bgc"]
    if "vm" in merged and parse_bool("vm", merged.pop("vm")):
        raise BadParameter("vm (ViTMatte refinement) is not supported by this server")
    return _options(merged, _REMBG_FIELDS)


def query_options(query: Mapping[str, str]) -> RemoveOptions:
    """Options of ``POST /remove``, all in the query string."""
    return _options(query, _QUERY_FIELDS)


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def receive_within_limit() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        return message

    return receive_within_limit


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``limit`` bytes."""
    _check_declared_length(request, limit)
    return await Request(request.scope, _limited(request.receive, limit)).body()


@dataclass(frozen=True)
class Upload:
    data: bytes
    fields: dict[str, str]


async def read_multipart(request: Request, limit: int) -> Upload:
    """A multipart/form-data body: the ``file`` part's bytes and the text fields."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadParameter("send multipart/form-data with the image in a field named 'file'")
    _check_declared_length(request, limit)
    limited = Request(request.scope, _limited(request.receive, limit))
    try:
        form = await limited.form(max_files=1, max_fields=32, max_part_size=64 * 1024)
    except MultiPartException as exc:
        raise BadParameter(f"malformed multipart body: {exc.message}") from exc
    except HTTPException as exc:
        # Inside an app Starlette re-raises MultiPartException as a 400
        # HTTPException; keep the error code the same as outside one.
        raise BadParameter(f"malformed multipart body: {exc.detail}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadParameter("the multipart body has no file field named 'file'")
        data = await upload.read()
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    finally:
        await form.close()
    return Upload(data=data, fields=fields)
