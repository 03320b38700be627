"""A Serve app that does no work, for the fastpath bench: the floor of Serve's own
request path under the service's HTTP and logging settings.

``POST /remove`` reads the upload and answers a fixed 64x64 transparent PNG;
``GET /healthz`` answers 200. One FastAPI ingress replica, as the service's.
"""

# No `from __future__ import annotations`: FastAPI reads the handler's
# annotations as objects (a string "Request" read as a query parameter: 422).
import io
from typing import cast

from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from ray import serve

api = FastAPI()


def _blank_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (64, 64)).save(out, "PNG")
    return out.getvalue()


@serve.deployment(max_ongoing_requests=96)
@serve.ingress(api)
class Echo:
    def __init__(self) -> None:
        self.body = _blank_png()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/remove")
    async def remove(self, request: Request) -> Response:
        await request.body()
        return Response(self.body, media_type="image/png")


# @serve.deployment turned the class into a Deployment; mypy sees a class.
app = cast(serve.Deployment, Echo).bind()
