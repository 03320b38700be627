"""The Python client against the running service."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, Service, gradient, image_bytes, load_image
from deployments.client import ApiError, AsyncClient, Client, Options

CAR = FIXTURES / "car-1.jpg"


def test_remove_a_file_and_bytes(service: Service) -> None:
    with Client(service.url) as client:
        from_path = client.remove(CAR)
        from_bytes = client.remove(CAR.read_bytes())
    original = load_image(CAR)
    assert (from_path.width, from_path.height) == original.size
    assert from_path.model == "u2netp" and from_path.media_type == "image/png"
    assert from_path.data == from_bytes.data
    alpha = np.asarray(Image.open(io.BytesIO(from_path.data)).getchannel("A"))
    assert alpha.min() == 0 and alpha.max() == 255


def test_options_reach_the_service(service: Service) -> None:
    with Client(service.url) as client:
        mask = client.remove(image_bytes(gradient()), Options(only_mask=True))
        webp = client.remove(image_bytes(gradient()), Options(format="webp"))
    assert Image.open(io.BytesIO(mask.data)).mode == "L"
    assert webp.media_type == "image/webp"
    assert Image.open(io.BytesIO(webp.data)).format == "WEBP"


def test_health_and_models(service: Service) -> None:
    with Client(service.url) as client:
        health = client.health()
        models = client.models()
    assert health.ok and health.models == {"u2netp": True}
    assert models.default == "u2netp"
    (u2netp,) = models.models
    assert (u2netp.name, u2netp.ready, u2netp.file, u2netp.device) == (
        "u2netp",
        True,
        "u2netp.onnx",
        "cpu",
    )


def test_async_client_concurrently(service: Service) -> None:
    images = [image_bytes(gradient(40 + 8 * i, 30 + 4 * i)) for i in range(6)]

    async def run() -> list[tuple[int, int]]:
        async with AsyncClient(service.url) as client:
            assert (await client.health()).ok
            results = await asyncio.gather(*(client.remove(img) for img in images))
            with pytest.raises(ApiError, match="unsupported_image"):
                await client.remove(b"junk")
            return [(r.width, r.height) for r in results]

    assert asyncio.run(run()) == [(40 + 8 * i, 30 + 4 * i) for i in range(6)]


def test_async_remove_reads_a_path(service: Service, tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    path.write_bytes(image_bytes(gradient()))

    async def run() -> bytes:
        async with AsyncClient(service.url) as client:
            return (await client.remove(path)).data

    assert Image.open(io.BytesIO(asyncio.run(run()))).size == (64, 48)


@pytest.mark.parametrize(
    ("data", "options", "status", "code"),
    [
        (b"not an image", Options(), 415, "unsupported_image"),
        (b"", Options(model="no-such-model"), 404, "unknown_model"),
        # Built unchecked, so that the service's own 400 comes back.
        (b"x", Options.model_construct(alpha_matting_erode_size=1000), 400, "bad_parameter"),
    ],
)
def test_errors_are_typed(
    service: Service, data: bytes, options: Options, status: int, code: str
) -> None:
    payload = data or image_bytes(gradient())
    with Client(service.url) as client, pytest.raises(ApiError) as raised:
        client.remove(payload, options)
    assert (raised.value.status, raised.value.code) == (status, code)
    assert raised.value.message
