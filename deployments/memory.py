"""Memory readings and housekeeping: this process's memory, Pillow's cache of
freed image blocks and the C heap.

``rss_bytes`` and ``read_device_memory`` read what the process holds, in host
memory and on a GPU; ``HostMemory`` and ``DeviceMemory`` charge a model load
what it grew either by. ``reuse_image_memory`` lets Pillow keep freed blocks for
the next image; ``IdleTrimmer`` gives them, and the C heap's free memory, back
to the system when the replica goes idle. No Ray.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

from PIL import _imaging as pillow_core

from deployments.runtime import nvml_read

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What a pool's budget counts: host memory (RSS), or memory on the replica's GPU.
MemoryKind = Literal["host", "device"]


def rss_bytes() -> int:
    """This process's resident memory now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@dataclass(frozen=True)
class DeviceReading:
    """One GPU's memory in use now, in bytes."""

    # This process's, as NVML lists it; None where it is not listed: no CUDA
    # context yet, or a container's own pid namespace (NVML lists host pids).
    process: int | None
    # The whole card's, every process's together.
    device: int


def read_device_memory(device: int | str) -> DeviceReading | None:
    """GPU ``device``'s memory in use (``device`` as Ray reports it: an index or a
    UUID), read through NVML (nvidia-ml-py); None where NVML cannot be read."""

    def read(pynvml: Any, handle: Any) -> DeviceReading:
        pid = os.getpid()
        mine = [
            int(p.usedGpuMemory)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == pid and p.usedGpuMemory is not None
        ]
        used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        return DeviceReading(sum(mine) if mine else None, used)

    return nvml_read(device, read)


def device_growth(before: DeviceReading, after: DeviceReading) -> int:
    """What this process took on the card between two readings: its own growth
    where NVML lists it (absent before: it had no CUDA context yet), else the
    card's, which is this process's as long as it is the only one allocating.

    A replica's first load also creates its CUDA context, which stays: that
    model is charged it too, until its next load is measured without it."""
    if after.process is not None:
        return max(0, after.process - (before.process or 0))
    return max(0, after.device - before.device)


class HostMemory:
    """Charges a load the growth of this process's resident memory over it."""

    kind: MemoryKind = "host"

    def charge(self, load: Callable[[], T]) -> tuple[T, int]:
        """``load()``'s value and the bytes it took."""
        before = rss_bytes()
        value = load()
        return value, max(0, rss_bytes() - before)


class DeviceMemory:
    """Charges a load the growth of this process's memory on GPU ``device`` over
    it (``device_growth``). ``read`` is NVML's reading (a test's fake where there
    is no GPU). A load whose readings fail is charged its host memory growth
    instead, with a warning the first time."""

    kind: MemoryKind = "device"

    def __init__(
        self,
        device: int | str,
        read: Callable[[int | str], DeviceReading | None] = read_device_memory,
    ) -> None:
        self.device = device
        self._read = read
        self._warned = False

    def readable(self) -> bool:
        return self._read(self.device) is not None

    def charge(self, load: Callable[[], T]) -> tuple[T, int]:
        """``load()``'s value and the bytes it took on the card."""
        rss = rss_bytes()
        before = self._read(self.device)
        value = load()
        after = self._read(self.device)
        if before is None or after is None:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "GPU %s's memory could not be read (NVML): a load is charged "
                    "its host memory growth",
                    self.device,
                )
            return value, max(0, rss_bytes() - rss)
        return value, device_growth(before, after)


# Freed image memory Pillow keeps, in bytes per pixel of the budget: one RGBA
# image's worth (a pixel in flight holds ~12 bytes: decoded, cut-out, mask, PNG).
KEPT_BYTES_PER_PIXEL = 4


def reuse_image_memory(pixel_budget: int) -> None:
    """Let Pillow keep freed image blocks for the next image, up to 4 bytes per
    pixel of ``pixel_budget``.

    Pillow gives each image's memory back to the C library when the image goes,
    and the next image's fresh pages are faulted in again: at 12 MP that was
    45,000 page faults and ~17 % of the CPU of decode-to-PNG, at 2 MP ~10 %
    (measured in process on a 2-core VM). A kept block held an image before, so
    Pillow's own memory stays within its peak in flight; but the C library cannot
    give kept blocks to numpy meanwhile, so the cache is bounded to a third of
    the budget's bytes. ``release_image_memory`` empties it, for an idle replica.
    """
    block = int(pillow_core.get_block_size())
    pillow_core.set_blocks_max(max(1, -(-pixel_budget * KEPT_BYTES_PER_PIXEL // block)))


def release_image_memory() -> None:
    """Give Pillow's kept image blocks back to the C library."""
    pillow_core.clear_cache()


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, where there is one (Linux)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return None if trim is None else partial(trim, 0)


class IdleTrimmer:
    """Gives Pillow's kept blocks and the C heap's free memory back to the system
    when a replica goes idle (glibc keeps it otherwise, so a burst of large images
    would leave the replica's RSS at its peak), at most once per ``every_s``.

    ``idle()`` says whether the replica is idle now; the trim itself runs on
    ``executor``, off the event loop.
    """

    def __init__(self, idle: Callable[[], bool], executor: Executor, every_s: float = 2.0) -> None:
        self.idle = idle
        self.executor = executor
        self.every_s = every_s
        self._trim = malloc_trim()
        self._trimmed = 0.0
        self._pending = False

    def went_idle(self) -> None:
        """Give the memory back now, or, if that was done less than ``every_s``
        ago, once ``every_s`` has passed, if the replica is still idle then (the
        last request of a burst must not leave its memory held). On the event loop."""
        loop = asyncio.get_running_loop()
        wait_s = self._trimmed + self.every_s - time.monotonic()
        if wait_s <= 0:
            self._trimmed = time.monotonic()
            # Not awaited: the answer does not wait for it.
            loop.run_in_executor(self.executor, self.give_back)
        elif not self._pending:
            self._pending = True
            loop.call_later(wait_s, self._later)

    def give_back(self) -> None:
        release_image_memory()
        if self._trim is not None:
            self._trim()

    def _later(self) -> None:
        self._pending = False
        if self.idle():
            self.went_idle()
