"""``rembg-serve``: start the service, fetch models, send folders through it, check it.

rembg-serve up                                # `serve run serve_config.yaml`, fast path on
rembg-serve fetch u2net isnet-general-use    # into rembg's model store
rembg-serve remove photos/ -o out/ --concurrency 16
rembg-serve batch photos/ out/                # on Ray Data, no service
rembg-serve health --url http://10.0.0.5:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args, get_origin

import httpx

from deployments.client import DEFAULT_URL, ApiError, AsyncClient, Client, Options, Retry
from deployments.decode import Limits
from deployments.files import FileJob, output_is_whole, plan, remove_leftovers, write_atomic
from deployments.launch import add_up_command
from deployments.options import OptionsError, parse
from deployments.reports import PoolReport
from deployments.settings import AppSettings, LiveModelConfig

API_KEY_ENV = "REMBG_SERVE_API_KEY"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return f"{exc.status} {exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, or ``ApiError`` 413 (said here, not sent) if over ``max_bytes``."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        data = file.read(max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(data) > max_bytes:
        raise ApiError(
            413,
            "payload_too_large",
            f"the file is {max(size, len(data))} bytes, over the upload limit of {max_bytes} "
            "(--max-upload-bytes): not sent",
        )
    return data


async def remove_all(
    jobs: Sequence[FileJob],
    client: AsyncClient,
    options: Options,
    concurrency: int,
    progress: bool = True,
    max_upload_bytes: int = Limits().max_upload_bytes,
) -> tuple[int, int, list[tuple[Path, str]]]:
    """Sends every job not done yet; returns (done, skipped, failures).

    Done means a whole output is there (``output_is_whole``): an empty or torn
    one is sent again. A file's failure (the service's answer, the network, a
    file over the upload limit, an answer that cannot be read) is its line in
    the failures, never the run's end.
    """
    from tqdm import tqdm

    todo = [job for job in jobs if not output_is_whole(job.target)]
    skipped = len(jobs) - len(todo)
    remove_leftovers(job.target for job in todo)
    failures: list[tuple[Path, str]] = []
    queue: asyncio.Queue[FileJob] = asyncio.Queue()
    for job in todo:
        queue.put_nowait(job)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr)

    async def worker() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            try:
                data = await asyncio.to_thread(_read_bounded, job.source, max_upload_bytes)
                result = await client.remove(data, options)
                await asyncio.to_thread(write_atomic, job.target, result.data)
            # ValueError: an answer the client could not read (a bad X-Width, ...).
            except (ApiError, httpx.HTTPError, OSError, ValueError) as exc:
                failures.append((job.source, _describe(exc)))
                bar.set_postfix(failed=len(failures))
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        bar.close()
    return len(todo) - len(failures), skipped, failures


# Shorter or older spellings of some option flags, kept working.
_FLAG_ALIASES = {
    "model": ["-m"],
    "alpha_matting": ["-a"],
    "alpha_matting_foreground_threshold": ["--foreground-threshold"],
    "alpha_matting_background_threshold": ["--background-threshold"],
    "alpha_matting_erode_size": ["--erode-size"],
}


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of ``POST /remove``'s query (``--only-mask``, ...)."""
    group = parser.add_argument_group("options (as POST /remove's query)")
    for name, info in Options.model_fields.items():
        flags = [f"--{name.replace('_', '-')}", *_FLAG_ALIASES.get(name, [])]
        kind = info.annotation
        default = info.get_default()
        help_text = (
            info.description if default in (None, False) else f"{info.description} ({default})"
        )
        if kind is bool:
            group.add_argument(*flags, dest=name, action="store_true", default=None, help=help_text)
        elif get_origin(kind) is Literal:
            group.add_argument(*flags, dest=name, choices=get_args(kind), help=help_text)
        elif kind is int:
            group.add_argument(*flags, dest=name, type=int, metavar="N", help=help_text)
        else:
            group.add_argument(*flags, dest=name, metavar="VALUE", help=help_text)


def options_from(args: argparse.Namespace) -> Options:
    """The flags given, validated as the service validates its query."""
    given = {n: getattr(args, n) for n in Options.model_fields if getattr(args, n) is not None}
    return parse(
        Options, {n: str(v).lower() if isinstance(v, bool) else str(v) for n, v in given.items()}
    )


def cmd_remove(args: argparse.Namespace) -> int:
    try:
        options = options_from(args)
        jobs = plan(args.inputs, args.output, "." + options.format)
    except (FileNotFoundError, OptionsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> tuple[int, int, list[tuple[Path, str]]]:
        async with AsyncClient(
            args.url,
            api_key=args.api_key,
            timeout_s=args.timeout,
            retry=Retry(attempts=args.retries + 1),
            max_connections=args.concurrency,
        ) as client:
            return await remove_all(
                jobs,
                client,
                options,
                args.concurrency,
                progress=not args.quiet,
                max_upload_bytes=args.max_upload_bytes,
            )

    done, skipped, failures = asyncio.run(run())
    print(f"{done} done, {skipped} already there, {len(failures)} failed -> {args.output}")
    for source, reason in failures:
        print(f"  FAILED {source}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def cmd_batch(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deployments.errors import ModelUnavailable

    # Imported here: bulk mode pulls in Ray Data, which the other commands never need.
    try:
        from deployments.bulk import BulkConfig, main_run, model_config
    except ImportError as exc:
        print(
            f"bulk mode needs Ray Data ({exc.name} is missing): pip install 'rembg-serve[bulk]'",
            file=sys.stderr,
        )
        return 2

    config_file = args.config
    if config_file is None and Path("serve_config.yaml").is_file():
        config_file = Path("serve_config.yaml")
    try:
        query = options_from(args)
        settings = (
            AppSettings() if config_file is None else AppSettings.from_serve_config(config_file)
        )
        # A dedicated or pooled name of these settings, or one of rembg's; else
        # the error lists them.
        model_config(settings, query.model)
    except (ModelUnavailable, OSError, OptionsError, ValidationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = BulkConfig(
        settings=settings,
        model=query.model,
        options=query.cutout(),
        fmt=query.format,
        fidelity=query.fidelity,
        batch_size=args.batch_size,
        max_actors=args.actors,
        progress=not args.quiet,
    )
    try:
        return main_run(args.input, args.output, config, args.address)
    # ValueError: the plan refused the run (PlanRefused), before any work.
    except (FileNotFoundError, ModelUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_health(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, api_key=args.api_key, timeout_s=args.timeout) as client:
            health = client.health()
            models = client.models()
    except (ApiError, httpx.HTTPError) as exc:
        print(f"unreachable or failing: {args.url}: {_describe(exc)}", file=sys.stderr)
        return 2
    if args.json:
        report = models.model_dump(mode="json", exclude_unset=True)  # as /models sent it
        print(json.dumps({"ok": health.ok, "health": health.models, **report}, indent=2))
    else:
        print(f"{args.url}: {'healthy' if health.ok else 'NOT healthy'}")
        for info in models.models:
            warm = "warm" if health.models.get(info.name) else "not ready"
            default = " (default)" if info.name == models.default else ""
            detail = ""
            if info.provider is not None:
                detail = (
                    f" {info.device} {info.provider}, batch <= {info.max_batch_size}"
                    f", batches formed {info.batch_sizes_formed or {}}"
                )
            print(f"  {info.name}{default}: {warm}{detail}")
        if models.pool is not None:
            for line in _pool_lines(models.pool, models.default):
                print(line)
    return 0 if health.ok else 1


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _pool_lines(pool: PoolReport, default: str) -> list[str]:
    """The pooled models as ``health`` prints them: the answering replica, then
    each model, loaded there or not, its size and its counts."""
    replica = pool.replica
    if replica is None:
        return [
            f"  pool: no replica answered ({pool.reason or 'unknown'}); "
            f"pooled: {', '.join(pool.models)}"
        ]
    lines = [
        f"  pool, replica {replica.replica} (pid {replica.pid}): "
        f"{_mib(replica.used_bytes)} of {_mib(replica.budget_bytes)} used"
    ]
    for model in replica.models:
        where = f"loaded on {replica.replica}" if model.loaded else "not loaded"
        size = "" if model.bytes is None else f", {_mib(model.bytes)}"
        leases = f", {model.leases} in use" if model.leases else ""
        error = f", last load failed: {model.error}" if model.error else ""
        mark = " (default)" if model.name == default else ""
        lines.append(
            f"    {model.name}{mark}: {where}{size}{leases}, loads {model.loads}, "
            f"hits {model.hits}, evictions {model.evictions}, failures {model.failures}{error}"
        )
    return lines


def cmd_fetch(args: argparse.Namespace) -> int:
    from deployments.errors import ServiceError
    from deployments.models import EMBEDDED, MODEL_TABLE, fetch_model

    names = list(args.models)
    if not names:
        if not args.config.is_file():
            print(
                f"name models to fetch, or give a config (--config); known: "
                f"{', '.join(MODEL_TABLE)}",
                file=sys.stderr,
            )
            return 2
        try:
            settings = AppSettings.from_serve_config(args.config)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        # A model given a path is read from there: nothing to fetch for it.
        names = [model.name for model in settings.models if model.path is None]
    failed = 0
    for name in names:
        if name in EMBEDDED:
            print(f"{name}: embedded in the package, nothing to fetch")
            continue
        try:
            print(f"{name}: {fetch_model(name)}")
        except (ServiceError, OSError, ValueError) as exc:
            # pooch raises ValueError on a checksum mismatch.
            failed += 1
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
    return 1 if failed else 0


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"sent as X-API-Key (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="rembg-serve", description="Background removal on Ray Serve: the command line."
    )
    sub = root.add_subparsers(dest="command", required=True)

    add_up_command(sub)

    fetch = sub.add_parser("fetch", help="download models into rembg's model store")
    fetch.add_argument("models", nargs="*", metavar="MODEL")
    fetch.add_argument(
        "--config",
        type=Path,
        default=Path("serve_config.yaml"),
        help="with no MODEL: fetch the models this config serves",
    )
    fetch.set_defaults(func=cmd_fetch)

    remove = sub.add_parser("remove", help="send files or folders through the service")
    remove.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    remove.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    _add_connection(remove)
    remove.add_argument("-c", "--concurrency", type=int, default=8)
    remove.add_argument("--retries", type=int, default=5, help="on 503 and network errors")
    remove.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    remove.add_argument(
        "--max-upload-bytes",
        type=int,
        default=Limits().max_upload_bytes,
        metavar="N",
        help="a larger file is a failure, not sent: the service's limit (%(default)s)",
    )
    add_option_flags(remove)
    remove.set_defaults(func=cmd_remove)

    batch = sub.add_parser(
        "batch", help="cut out a folder or bucket on Ray Data: the same model and pixels, no HTTP"
    )
    batch.add_argument("input", metavar="INPUT", help="a folder, a glob or a URI (s3://...)")
    batch.add_argument("output", metavar="OUTPUT", help="a folder or URI; INPUT's layout is kept")
    batch.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the service's settings from this Serve config (default: ./serve_config.yaml if any)",
    )
    batch.add_argument(
        "--address",
        default=None,
        help="a running Ray cluster (auto, ray://...); default: start one",
    )
    batch.add_argument(
        "--batch-size",
        type=int,
        default=LiveModelConfig().max_batch_size,
        help="images per model run (%(default)s)",
    )
    batch.add_argument("--actors", type=int, default=None, help="model copies at most")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_option_flags(batch)
    batch.set_defaults(func=cmd_batch)

    health = sub.add_parser("health", help="the service's health and models; exit 0 if healthy")
    _add_connection(health)
    health.add_argument("--json", action="store_true")
    health.set_defaults(func=cmd_health)
    return root


def main(argv: Iterable[str] | None = None) -> int:
    args = parser().parse_args(None if argv is None else list(argv))
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
