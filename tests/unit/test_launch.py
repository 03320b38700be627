"""`rembg-serve up`'s environment, and its HAProxy wrapper run for real (no Ray).

The wrapper test starts Ray's bundled ``haproxy`` through the wrapper from a parent
process, kills that parent with SIGKILL (as Ray's shutdown kills an actor) and
checks that haproxy dies with it and frees its port; the same without the wrapper
shows why it is there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from deployments.launch import FAST_PATH, HAPROXY_BINARY, _bundled_haproxy, fast_path_env

HAPROXY = _bundled_haproxy()
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="no haproxy binary on this platform")


def test_fast_path_is_set_where_the_caller_has_not_set_it(tmp_path: Path) -> None:
    env, said = fast_path_env({"PATH": os.environ["PATH"]}, tmp_path / "cache")
    for name, value in FAST_PATH.items():
        assert env[name] == value and f"{name}={value}" in said
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    if HAPROXY is not None:
        wrapper = Path(env[HAPROXY_BINARY])
        assert wrapper.parent == tmp_path / "cache" and os.access(wrapper, os.X_OK)
        assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


def test_the_callers_choices_win(tmp_path: Path) -> None:
    env, _said = fast_path_env(
        {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "5"}, tmp_path
    )
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "5"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert HAPROXY_BINARY not in env and not list(tmp_path.iterdir())
    chosen, _ = fast_path_env({HAPROXY_BINARY: "/opt/haproxy"}, tmp_path)
    assert chosen[HAPROXY_BINARY] == "/opt/haproxy"


def test_a_wrapper_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError):
        fast_path_env({"PATH": os.environ["PATH"]}, shared)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _haproxy_outlives_its_parent(tmp_path: Path, binary: str) -> tuple[bool, bool]:
    """``binary`` (haproxy or its wrapper) started by a parent that is then SIGKILLed:
    (haproxy still alive 3 s later, its port still taken)."""
    port = free_port()
    config = tmp_path / f"haproxy-{port}.cfg"
    config.write_text(
        "defaults\n  mode http\n  timeout client 5s\n  timeout server 5s\n"
        "  timeout connect 5s\n"
        f"frontend web\n  bind 127.0.0.1:{port}\n  http-request return status 200\n"
    )
    pid_file = tmp_path / f"child-{port}.pid"
    # The parent starts haproxy, writes its pid, and waits (as Ray's actor does).
    parent_code = (
        "import subprocess, sys, time, pathlib;"
        f"p = subprocess.Popen([{binary!r}, '-db', '-f', {str(config)!r}]);"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid));"
        "time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], start_new_session=True)
    child = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (pid_file.exists() and _listening(port)):
            time.sleep(0.05)
        assert _listening(port), "haproxy did not start"
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        time.sleep(3)
        alive = Path(f"/proc/{child}").exists() and "zombie" not in _state(child)
        return alive, _listening(port)
    finally:
        parent.kill()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"


@needs_haproxy
def test_haproxy_through_the_wrapper_dies_with_its_parent(tmp_path: Path) -> None:
    env, _ = fast_path_env({"PATH": os.environ["PATH"]}, tmp_path / "cache")
    assert _haproxy_outlives_its_parent(tmp_path, env[HAPROXY_BINARY]) == (False, False)


@needs_haproxy
def test_plain_haproxy_outlives_its_parent(tmp_path: Path) -> None:
    """Why the wrapper exists: without it the orphan keeps serving the port."""
    assert HAPROXY is not None
    assert _haproxy_outlives_its_parent(tmp_path, HAPROXY) == (True, True)
