"""The in-process benchmark's one reach into Serve's batching, and its undoing."""

from __future__ import annotations

import asyncio
import gc

import pytest
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.bench.throughput import batching_outside_a_replica


def _four_at_once() -> tuple[list[int], list[int]]:
    """Four calls at once to a @serve.batch method, as a deployment would have one:
    the results, and the sizes of the batches it formed."""
    sizes: list[int] = []

    async def run() -> list[int]:
        # A new class each time: Serve keeps one batch queue per decorated function,
        # tied to the event loop it started on. Defined inside the running loop:
        # outside one, the decorator makes an event loop of its own and never closes it.
        class Doubler:
            @serve.batch(max_batch_size=4, batch_wait_timeout_s=1.0)
            async def double(self, values: list[int]) -> list[int]:
                sizes.append(len(values))
                return [2 * v for v in values]

        doubler = Doubler()
        try:
            return list(await asyncio.gather(*(doubler.double(v) for v in range(4))))
        finally:
            # Serve's batch queue stops its task when collected; collected later,
            # outside this loop, it would make an event loop that nothing closes.
            del doubler, Doubler
            gc.collect()

    return asyncio.run(run()), sizes


def test_in_process_batching_is_serves_and_only_while_open() -> None:
    """The in-process benchmark runs Serve's own batching outside a replica; the
    check it skips for that is back once the context closes."""
    with batching_outside_a_replica():
        assert _four_at_once() == ([0, 2, 4, 6], [4])  # one batch of four
    with pytest.raises(RayServeException, match="within a Ray Serve deployment"):
        _four_at_once()
