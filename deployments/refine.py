"""The refiners' compile child: pymatting's numba code compiled aside.

``compile_refiners_aside`` runs ``python -m deployments.refine`` at the lowest
CPU priority and pauses it (SIGSTOP) while the replica is busy: it fills numba's
disk cache, so that loading the refiners in the replica afterwards is quick.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress

logger = logging.getLogger("ray.serve")

_PR_SET_PDEATHSIG = 1


async def compile_refiners_aside(
    busy: Callable[[], bool], patience_s: float = 120, timeout_s: float = 900
) -> None:
    """``warm_refine`` in a child process at nice 19, paused (SIGSTOP) while
    ``busy()``: it fills numba's disk cache without taking CPU from requests,
    even the little a niced process takes (ONNX Runtime's threads wait for the
    slowest of them). After ``patience_s`` paused it runs on regardless.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "deployments.refine",
        # The child finds this package where this process does.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    done = asyncio.ensure_future(process.communicate())
    started = time.monotonic()
    paused, paused_s = False, 0.0
    try:
        while not done.done():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the refiners did not compile in {timeout_s}s")
            pause = busy() and paused_s < patience_s
            if pause != paused:
                with suppress(ProcessLookupError):
                    process.send_signal(signal.SIGSTOP if pause else signal.SIGCONT)
                paused = pause
            tick = time.monotonic()
            await asyncio.wait([done], timeout=0.05)
            paused_s += (time.monotonic() - tick) if paused else 0.0
    finally:
        if not done.done():
            with suppress(ProcessLookupError):
                process.kill()
            await done
    _, err = done.result()
    if process.returncode != 0:
        # Loading in this process will compile instead, and fail with its reason.
        logger.warning("refiners' compile process failed: %s", err.decode(errors="replace")[-500:])


async def quiet_for(busy: Callable[[], bool], seconds: float, patience_s: float) -> None:
    """Until ``busy()`` has been false for ``seconds`` (at most ``patience_s``)."""
    deadline = time.monotonic() + patience_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        if busy():
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= seconds:
            return
        await asyncio.sleep(0.1)


def _main() -> None:
    # Killed with the thread that started it (a stopped child would otherwise
    # outlive a replica killed meanwhile), at the lowest priority.
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.nice(19)
    # Imported only now: the compile itself runs at the lowest priority.
    from deployments.compose import warm_refine

    warm_refine()


if __name__ == "__main__":
    _main()
