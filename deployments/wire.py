"""Request bodies off the wire, within the byte limit and the read deadline.

The body is counted as it is read and refused with 413 as soon as it passes the
limit (at once when ``Content-Length`` already says so); one not received whole
within ``timeout_s`` gets a 408 (Serve's proxy streams the body to the replica as
the client sends it, so a client that trickles it would otherwise hold its
connection for as long as it likes). Imports Starlette but no Ray, so it is
tested without a cluster.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message, Receive

from deployments.errors import BadParameter, PayloadTooLarge, RequestTimeout


def _limited(receive: Receive, limit: int, timeout_s: float | None) -> Receive:
    seen = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def receive_within_limit() -> Message:
        nonlocal seen
        if deadline is None:
            message = await receive()
        else:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body was not received within {timeout_s:g}s"
                ) from None
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


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``limit`` bytes, and
    with 408 if it is not whole within ``timeout_s`` seconds."""
    _check_declared_length(request, limit)
    return await Request(request.scope, _limited(request.receive, limit, timeout_s)).body()


@dataclass(frozen=True)
class Upload:
    data: bytes
    fields: dict[str, str]


async def read_multipart(request: Request, limit: int, timeout_s: float | None = None) -> Upload:
    """A multipart/form-data body: the ``file`` part's bytes and the text fields
    (limits as ``read_body``)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadParameter("send multipart/form-data with the image in a field named 'file'")
    _check_declared_length(request, limit)
    limited = Request(request.scope, _limited(request.receive, limit, timeout_s))
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
