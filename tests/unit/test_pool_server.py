"""The pool deployment's class in this process, no Serve and no Ray: a failed batch
fails only the image that broke it.

``PoolServer``'s underlying class runs with its real ``ModelPool``; only the
model is a fake (the unit tier runs no real session), so that one image of a
batch can be made to fail.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from deployments.errors import InferenceFailed, ServiceError
from deployments.infer import WarmupReport
from deployments.model_server import Resources
from deployments.pool import Loaded
from deployments.pool_server import PoolPending, PoolServer

SERVER: Any = PoolServer.func_or_class  # type: ignore[attr-defined]
POOL = {"models": [{"name": "pooled", "model": "u2netp"}], "budget_bytes": 10**9}


class FailsOnMarkedImage:
    """FAKE model: each image's mask is its red channel, except that a batch
    holding an image whose first pixel is 255 raises ``error``, as a broken input
    would. Records the size of every batch it runs."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.report = WarmupReport()
        self.batches: list[int] = []

    def predict(self, images: list[npt.NDArray[np.uint8]]) -> list[npt.NDArray[np.uint8]]:
        self.batches.append(len(images))
        if any(image[0, 0, 0] == 255 for image in images):
            raise self.error
        return [image[:, :, 0].copy() for image in images]


def server_with(model: FailsOnMarkedImage) -> Any:
    server = SERVER(POOL, 0.0, resources=Resources(cpus=1))
    # The pool's own load path, with the fake in place of the ONNX session.
    server._build = lambda name, max_batch_size: Loaded(model, 1)
    return server


@pytest.mark.parametrize("error", [InferenceFailed("bad input"), ValueError("bad shape")])
def test_one_bad_image_never_fails_its_pooled_batchmates(error: Exception) -> None:
    model = FailsOnMarkedImage(error)
    server = server_with(model)
    good = [np.full((320, 320, 3), v, dtype=np.uint8) for v in (10, 90, 170)]
    bad = np.full((320, 320, 3), 255, dtype=np.uint8)
    items = [PoolPending("pooled", image, 0.0) for image in (good[0], bad, good[1], good[2])]

    async def scenario() -> list[npt.NDArray[np.uint8] | ServiceError]:
        async with server.pool.lease("pooled"):
            results: list[npt.NDArray[np.uint8] | ServiceError] = await server._run_group(
                "pooled", items
            )
            return results

    results = asyncio.run(scenario())
    assert len(results) == 4  # one result per request, always
    assert isinstance(results[1], InferenceFailed)
    if isinstance(error, ServiceError):
        assert results[1] is error  # our own error reaches its caller as it was
    for i, image in zip((0, 2, 3), good, strict=True):
        assert np.array_equal(results[i], image[:, :, 0])
    # The batch failed once, then each image ran alone.
    assert model.batches == [4, 1, 1, 1, 1]
