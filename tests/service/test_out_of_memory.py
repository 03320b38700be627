"""Device out of memory, simulated over the embedded model's real session (CPU): smaller
batches in warmed shapes, no silent fallback to the CPU."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from conftest import SHARED_IMAGES
from deployments.decode import Limits, decode
from deployments.errors import InferenceFailed
from deployments.infer import OnnxModel
from deployments.preprocess import model_input

BODIES = [p.read_bytes() for p in SHARED_IMAGES]


class OutOfMemoryOverTwo:
    """FAKE: no GPU runs here, so CUDA's out-of-memory error is simulated.

    Wraps the real ONNX Runtime session: batches of more than ``limit`` images
    raise the error ORT's CUDA provider raises when the arena cannot grow;
    smaller batches run on the real session (CPU).
    """

    def __init__(self, session: Any, limit: int = 2) -> None:
        self.session = session
        self.limit = limit
        self.batch_sizes: list[int] = []

    def run(self, output_names: Any, feeds: dict[str, npt.NDArray[np.float32]]) -> Any:
        (batch,) = feeds.values()
        self.batch_sizes.append(len(batch))
        if len(batch) > self.limit:
            raise RuntimeError(
                "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
                "while running Conv node. CUDA failure 2: out of memory"
            )
        return self.session.run(output_names, feeds)


def _inputs(n: int) -> list[npt.NDArray[np.uint8]]:
    images = [model_input(decode(b, Limits()), (320, 320)) for b in BODIES]
    return [images[i % len(images)] for i in range(n)]


def test_out_of_memory_batch_retries_at_half_size(u2netp: OnnxModel) -> None:
    images = _inputs(4)
    want = u2netp.predict(images)
    faked = copy.copy(u2netp)
    fake = OutOfMemoryOverTwo(u2netp.session)
    faked.session = fake
    got = faked.predict(images)
    assert fake.batch_sizes == [4, 2, 2]
    assert len(got) == 4
    for mask, expected in zip(got, want, strict=True):
        assert np.array_equal(mask, expected)


def test_out_of_memory_retries_in_warmed_shapes_only(u2netp: OnnxModel) -> None:
    """On a GPU a batch of 7 runs padded to 8; out of memory, it is re-planned onto
    the warmed shapes below 8 (4 + 3 padded to 4), never onto a new shape (7, 3)
    whose first run would start cuDNN's search. The session runs on the CPU here."""
    images = _inputs(7)
    want = u2netp.predict(images)
    faked = copy.copy(u2netp)
    faked.runtime = dataclasses.replace(u2netp.runtime, use_gpu=True)  # padding on
    faked.buckets = [1, 2, 4, 8]
    fake = OutOfMemoryOverTwo(u2netp.session, limit=4)
    faked.session = fake
    got = faked.predict(images)
    assert fake.batch_sizes == [8, 4, 4]
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_session_never_falls_back_to_the_cpu_in_silence(u2netp: OnnxModel) -> None:
    # ONNX Runtime's Python session moves itself to the CPU for good after a
    # provider failure unless fallback is disabled.
    assert u2netp.session._enable_fallback is False


def test_out_of_memory_on_one_image_is_an_inference_error(u2netp: OnnxModel) -> None:
    faked = copy.copy(u2netp)

    class AlwaysOutOfMemory(OutOfMemoryOverTwo):
        def run(self, output_names: Any, feeds: dict[str, Any]) -> Any:
            raise RuntimeError("CUDA failure 2: out of memory")

    faked.session = AlwaysOutOfMemory(u2netp.session)
    with pytest.raises(InferenceFailed):
        faked.predict(_inputs(2))
