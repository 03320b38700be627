"""Memory housekeeping: Pillow's cache of freed image blocks and the C heap.

``reuse_image_memory`` lets Pillow keep freed blocks for the next image;
``IdleTrimmer`` gives them, and the C heap's free memory, back to the system
when the replica goes idle. No Ray.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial

from PIL import _imaging as pillow_core


def rss_bytes() -> int:
    """This process's resident memory now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


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
