"""The in-process benchmark's one reach into Serve's batching, and its undoing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator

import pytest
from ray import cloudpickle, serve
from ray.serve.exceptions import RayServeException

from deployments.bench.throughput import batching_outside_a_replica, drop_batch_queues


@pytest.fixture(autouse=True)
def _close_the_loop_serve_leaves() -> Iterator[None]:
    """Serve's batch queue, collected after its loop has closed, makes an event
    loop of its own to look at and leaves it set and open (ray.serve.batching's
    ``__del__``): collect it here and close that loop, not in a later test."""
    yield
    gc.collect()
    with contextlib.suppress(RuntimeError):
        asyncio.get_event_loop_policy().get_event_loop().close()
    asyncio.set_event_loop(None)


def _four_at_once() -> tuple[list[int], list[int]]:
    """Four calls at once to a @serve.batch method, as a deployment would have one:
    the results, and the sizes of the batches it formed."""
    sizes: list[int] = []

    async def run() -> list[int]:
        # A new class each time: Serve keeps one batch queue per decorated function,
        # tied to the event loop it started on.
        class Doubler:
            @serve.batch(max_batch_size=4, batch_wait_timeout_s=1.0)
            async def double(self, values: list[int]) -> list[int]:
                sizes.append(len(values))
                return [2 * v for v in values]

        doubler = Doubler()
        return list(await asyncio.gather(*(doubler.double(v) for v in range(4))))

    return asyncio.run(run()), sizes


def test_in_process_batching_is_serves_and_only_while_open() -> None:
    """The in-process benchmark runs Serve's own batching outside a replica; the
    check it skips for that is back once the context closes."""
    with batching_outside_a_replica():
        assert _four_at_once() == ([0, 2, 4, 6], [4])  # one batch of four
    with pytest.raises(RayServeException, match="within a Ray Serve deployment"):
        _four_at_once()


def test_a_class_batched_in_process_can_still_be_deployed() -> None:
    """Serve pickles a deployment's class; a batch queue built in this process
    cannot be pickled, so the in-process run drops the ones it built (the
    benchmark deploys ModelServer after running it in process), on its own loop."""

    class Halver:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.1)
        async def halve(self, values: list[int]) -> list[int]:
            return [v // 2 for v in values]

    async def run() -> list[int]:
        halver = Halver()
        halves = list(await asyncio.gather(halver.halve(2), halver.halve(4)))
        with pytest.raises(TypeError, match="pickle"):
            cloudpickle.dumps(Halver)  # the queue built here is in the class
        await drop_batch_queues(Halver)
        return halves

    with batching_outside_a_replica():
        assert asyncio.run(run()) == [1, 2]
    assert cloudpickle.loads(cloudpickle.dumps(Halver)).__name__ == "Halver"
