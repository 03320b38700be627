"""Bulk mode: a folder or bucket of images through the same stages and model, on Ray Data.

rembg-serve batch photos/ cutouts/ --model u2netp

``plan`` lists the inputs and maps each to its output, the folders kept (as
``rembg-serve remove`` does, same-named files apart), leaving out those already
written: a rerun resumes. ``run`` then streams the rest, as batches of file names,
to an autoscaling Ray Data actor pool of ``Cutter``: each actor holds one warm
``OnnxModel`` and runs the service's stages (``deployments.pipeline``) around it,
read + decode + resize -> the model, on the batch -> compose + encode + write, so
that a cut-out is the endpoint's, pixel for pixel, and nothing but names and
results crosses Ray's object store. Each output is written under a temporary name
and renamed: a killed run never leaves a half-written file. An image that cannot
be read, decoded or served becomes a line of the failures report, never an error
of the run. One run at a time per output folder.

Paths are local, or any URI pyarrow's filesystems open (``s3://``, ``gs://``,
``abfs://``, ``hdfs://``), each node reading and writing directly.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.fs as pafs
import ray
from ray.data import ActorPoolStrategy, DataContext

from deployments.cli import IMAGE_SUFFIXES, output_names
from deployments.compose import RefineLimits
from deployments.decode import Limits, probe
from deployments.errors import InferenceFailed, PayloadTooLarge, ServiceError
from deployments.models import resolve_model_file, spec_for
from deployments.options import CutoutOptions, Fidelity, OutputFormat
from deployments.pipeline import Prepared, finish, prepare, reuse_image_memory
from deployments.settings import AppSettings, LiveModelConfig, ModelConfig

logger = logging.getLogger(__name__)

FAILURES_NAME = "_failures.jsonl"
_PARTIAL = ".part"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path on it (local paths made absolute)."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _is_image(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES


def list_inputs(uri: str) -> list[tuple[str, PurePosixPath]]:
    """Every image under ``uri`` (a folder, a file or a local glob) with its
    path relative to the folder (for a glob: to the folder before its first
    wildcard), sorted."""
    if "://" not in uri and glob.has_magic(uri):
        parts = Path(uri).expanduser().parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        base = Path(*parts[:fixed]).resolve() if fixed else Path.cwd()
        files = (Path(p).resolve() for p in glob.glob(str(Path(*parts)), recursive=True))
        return sorted(
            (str(p), PurePosixPath(p.relative_to(base).as_posix()))
            for p in files
            if p.is_file() and _is_image(p.name)
        )
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [(root, PurePosixPath(PurePosixPath(root).name))]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such file or folder: {uri}")
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(
        (f.path, PurePosixPath(f.path).relative_to(root))
        for f in found
        if f.type == pafs.FileType.File and _is_image(f.path)
    )


@dataclass(frozen=True)
class Plan:
    """What a run does: (source, target) pairs still to do, and how many are done."""

    todo: list[tuple[str, str]]
    skipped: int
    output_root: str


def plan(input_uri: str, output_uri: str, suffix: str) -> Plan:
    """Inputs -> outputs under ``output_uri``, without those already written."""
    inputs = list_inputs(input_uri)
    names = output_names([rel for _, rel in inputs], suffix)
    fs, out_root = filesystem(output_uri)
    present = set()
    for f in fs.get_file_info(pafs.FileSelector(out_root, recursive=True, allow_not_found=True)):
        if f.type != pafs.FileType.File:
            continue
        if f.path.endswith(_PARTIAL):
            # Left by a killed run, never renamed into place: its image is redone.
            fs.delete_file(f.path)
        else:
            present.add(f.path)
    pairs = [
        (src, f"{out_root}/{name.as_posix()}")
        for (src, _), name in zip(inputs, names, strict=True)
        # OUTPUT inside INPUT: the cut-outs are not inputs of the next run.
        if not src.startswith(out_root + "/")
    ]
    todo = [(src, target) for src, target in pairs if target not in present]
    return Plan(todo=todo, skipped=len(pairs) - len(todo), output_root=out_root)


def _rss_mib() -> float:
    """This process's resident memory now, in MiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _failure(exc: BaseException) -> tuple[int, str]:
    """(HTTP-like status, message) of a failed image, as the endpoint would say it."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.message
    if isinstance(exc, OSError):
        return 500, f"could not read or write: {exc.strerror or type(exc).__name__}"
    return 500, f"{type(exc).__name__}"


def _read(fs: pafs.FileSystem, path: str, limits: Limits) -> bytes:
    with fs.open_input_file(path) as stream:
        if stream.size() > limits.max_upload_bytes:
            raise PayloadTooLarge(
                f"the file is {stream.size()} bytes; the limit is {limits.max_upload_bytes}"
            )
        data: bytes = stream.read()
        return data


def _write(fs: pafs.FileSystem, target: str, body: bytes) -> None:
    """``body`` at ``target``, through a temporary name: never half a file there."""
    fs.create_dir(str(PurePosixPath(target).parent), recursive=True)
    partial = target + _PARTIAL
    with fs.open_output_stream(partial) as out:
        out.write(body)
    fs.move(partial, target)


class PixelBudget:
    """Decoded pixels one actor holds at once (the service's ``pixel_budget``).

    A call takes room for its whole batch in one step (at most the whole budget),
    so that calls never hold part of it while waiting for the rest.
    """

    def __init__(self, pixels: int) -> None:
        self.capacity = self.free = pixels
        self.room = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.capacity)
        with self.room:
            self.room.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            with self.room:
                self.free += pixels
                self.room.notify_all()


@dataclass(frozen=True)
class Job:
    """What every image of a run gets: the cut-out, its format and the limits."""

    input_uri: str
    output_uri: str
    options: CutoutOptions
    fmt: OutputFormat
    limits: Limits
    png_compress_level: int
    refine: RefineLimits
    fidelity: Fidelity
    pixel_budget: int


class Cutter:
    """The pipeline on one actor: the service's ``OnnxModel``, loaded and warmed at
    every batch shape once, in ``__init__``, between the service's stages.

    Each call takes a batch of files: read, decode and resize each, run the model
    on them together, then compose, encode and write each. Ray Data runs a few
    calls at once on each actor (threads: Pillow, zlib and ONNX Runtime release
    the GIL), so that one call's decoding and encoding overlap another's model
    run; the model itself runs one batch at a time.
    """

    def __init__(
        self, model: dict[str, Any], num_gpus: float, max_batch_size: int, threads: int, job: Job
    ) -> None:
        # Imported in the actor: the driver needs no ONNX Runtime.
        from deployments.infer import OnnxModel
        from deployments.runtime import runtime_for

        config = ModelConfig.model_validate(model)
        context = ray.get_runtime_context()
        runtime = runtime_for(
            threads,
            [str(g) for g in ray.get_gpu_ids()],
            num_gpus,
            fp16=config.fp16,
            preprocess_in_graph=config.preprocess_in_graph,
        )
        self.model = OnnxModel(
            resolve_model_file(config.name, config.path),
            spec_for(config.name),
            runtime,
            max_batch_size,
        )
        self.job = job
        self.source_fs, _ = filesystem(job.input_uri)
        self.target_fs, _ = filesystem(job.output_uri)
        self.model_lock = threading.Lock()
        self.budget = PixelBudget(job.pixel_budget)
        reuse_image_memory(job.pixel_budget)
        self.actor = context.get_actor_id() or f"pid {os.getpid()}"
        logger.info(
            "model %s: %s, batch shapes %s, loaded in %.2fs, warm in %.2fs",
            config.name,
            self.model.provider,
            self.model.buckets,
            self.model.report.load_s,
            self.model.report.warmup_s,
        )

    def __call__(self, batch: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        job = self.job
        n = len(batch["source"])
        status = np.zeros(n, dtype=np.int16)
        message = np.full(n, "", dtype=object)
        pixels = np.zeros(n, dtype=np.int64)
        files: dict[int, bytes] = {}
        for i, source in enumerate(batch["source"]):
            try:
                files[i] = _read(self.source_fs, str(source), job.limits)
                width, height = probe(files[i], job.limits)
                pixels[i] = width * height
            except Exception as exc:  # one bad file fails alone
                files.pop(i, None)
                status[i], message[i] = _failure(exc)
        with self.budget.hold(int(pixels.sum())):
            self._cut(batch, files, status, message)
        return {
            "source": batch["source"],
            "status": status,
            "message": message,
            "pixels": pixels,
            "actor": np.full(n, self.actor, dtype=object),
            "rss_mib": np.full(n, _rss_mib()),
        }

    def _cut(
        self,
        batch: dict[str, npt.NDArray[Any]],
        files: dict[int, bytes],
        status: npt.NDArray[np.int16],
        message: npt.NDArray[Any],
    ) -> None:
        """Decode, the model, compose, encode and write; a failure is its image's."""
        job = self.job
        prepared: dict[int, Prepared] = {}
        for i, data in files.items():
            try:
                prepared[i] = prepare(data, self.model.spec, job.limits)
            except Exception as exc:  # one bad file fails alone
                status[i], message[i] = _failure(exc)
        files.clear()
        masks: dict[int, npt.NDArray[np.uint8]] = {}
        if prepared:
            try:
                with self.model_lock:
                    found = self.model.predict([p.model_input for p in prepared.values()])
                masks = dict(zip(prepared, found, strict=True))
            except InferenceFailed as exc:
                for i in prepared:
                    status[i], message[i] = exc.status, exc.message
        for i, mask in masks.items():
            try:
                image = prepared.pop(i).image
                body = finish(
                    image,
                    mask,
                    job.options,
                    job.fmt,
                    job.png_compress_level,
                    job.refine,
                    job.fidelity,
                ).body
                del image
                _write(self.target_fs, str(batch["target"][i]), body)
            except Exception as exc:  # one bad image fails alone
                status[i], message[i] = _failure(exc)


@dataclass
class Summary:
    """What a run did; ``failures`` are (source, status, message)."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    # Seconds until the first results (Ray Data's start, the actors' model load
    # and warm-up).
    first_results_s: float = 0.0
    # When the pool was full (as many images out as its calls hold at once) and
    # the images out by then: the steady rate is measured from there.
    steady_from_s: float = 0.0
    steady_from: int = 0
    megapixels: float = 0.0
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    # Per actor: its RSS after its first batch, and the highest seen after a batch.
    actor_rss_mib: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images/s once the pool was full (its start left out); 0 for a run too
        short to tell."""
        rest = self.done + self.failed - self.steady_from
        seconds = self.seconds - self.steady_from_s
        return rest / seconds if self.steady_from and rest > 0 and seconds > 0 else 0.0

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds else 0.0

    def add(self, rows: dict[str, npt.NDArray[Any]]) -> None:
        for i, source in enumerate(rows["source"]):
            if rows["status"][i]:
                self.failed += 1
                self.failures.append((str(source), int(rows["status"][i]), str(rows["message"][i])))
            else:
                self.done += 1
                self.megapixels += int(rows["pixels"][i]) / 1e6
            actor, rss = str(rows["actor"][i]), float(rows["rss_mib"][i])
            first, peak = self.actor_rss_mib.get(actor, (rss, rss))
            self.actor_rss_mib[actor] = (first, max(peak, rss))

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("failures")
        out["images_per_s"] = round(self.images_per_s, 3)
        out["steady_images_per_s"] = round(self.steady_images_per_s, 3)
        out["megapixels_per_s"] = round(self.megapixels_per_s, 3)
        return out


@dataclass(frozen=True)
class BulkConfig:
    """How a run uses the cluster: the service's settings plus the pool's shape."""

    settings: AppSettings = field(default_factory=AppSettings)
    model: str | None = None
    options: CutoutOptions = field(default_factory=CutoutOptions)
    fmt: OutputFormat = "png"
    fidelity: Fidelity | None = None  # None: the settings'
    batch_size: int = LiveModelConfig().max_batch_size
    # Model actors at most (None: as many as the cluster's GPUs or CPUs allow).
    max_actors: int | None = None
    # Batches in progress on each actor at once: while one runs the model, the
    # others decode and encode.
    calls_per_actor: int = 3
    progress: bool = True


def _model_config(config: BulkConfig) -> ModelConfig:
    name = config.model or config.settings.default_model_name
    for model in config.settings.models:
        if model.name == name:
            return model
    return ModelConfig(name=name)


def _actor_resources(config: BulkConfig) -> tuple[dict[str, float], int]:
    """Ray resources per actor and how many actors at most.

    As in the service, a model copy runs ``num_cpus`` intra-op threads, with a
    ``num_gpus`` share of a card where the cluster has GPUs. On a CPU-only
    cluster an actor asks Ray for no more CPUs than there are.
    """
    cluster = ray.cluster_resources()
    settings = config.settings
    cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    use_gpu = settings.device == "gpu" or (settings.device == "auto" and gpus > 0)
    if use_gpu:
        most = int(gpus / settings.num_gpus)
        resources = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
    else:
        asked = min(settings.num_cpus, cpus)
        most = int(cpus // asked)
        resources = {"num_cpus": asked}
    return resources, max(1, min(most, config.max_actors or most))


def run(input_uri: str, output_uri: str, config: BulkConfig) -> Summary:
    """Every image under ``input_uri`` not yet in ``output_uri``, cut out; Ray must
    be initialised (``ray.init``)."""
    model = _model_config(config)
    started = time.perf_counter()
    work = plan(input_uri, output_uri, "." + config.fmt)
    summary = Summary(skipped=work.skipped)
    if work.todo:
        context = DataContext.get_current()
        context.enable_progress_bars = config.progress
        resources, actors = _actor_resources(config)
        settings = config.settings
        job = Job(
            input_uri=input_uri,
            output_uri=output_uri,
            options=config.options,
            fmt=config.fmt,
            limits=settings.limits,
            png_compress_level=settings.png_compress_level,
            fidelity=config.fidelity or settings.fidelity,
            refine=settings.refine,
            pixel_budget=settings.pixel_budget,
        )
        dataset = ray.data.from_items(
            [{"source": s, "target": t} for s, t in work.todo],
            # Small blocks: each streams to an actor as soon as one is free.
            override_num_blocks=max(1, len(work.todo) // config.batch_size),
        ).map_batches(
            Cutter,
            batch_size=config.batch_size,
            compute=ActorPoolStrategy(
                min_size=1,
                max_size=actors,
                max_concurrent_calls_per_actor=config.calls_per_actor,
                enable_true_multi_threading=True,
            ),
            fn_constructor_kwargs={
                "model": model.model_dump(mode="json"),
                "num_gpus": resources.get("num_gpus", 0.0),
                "max_batch_size": config.batch_size,
                "threads": max(1, math.ceil(settings.num_cpus)),
                "job": job,
            },
            **resources,
        )
        # Images the pool holds at once: those out before that many are partly
        # the start's.
        in_flight = actors * config.calls_per_actor * config.batch_size
        for rows in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            if not summary.first_results_s:
                summary.first_results_s = time.perf_counter() - started
            summary.add(rows)
            out = summary.done + summary.failed
            if not summary.steady_from and out >= in_flight and out < len(work.todo):
                summary.steady_from_s = time.perf_counter() - started
                summary.steady_from = out
    summary.seconds = time.perf_counter() - started
    _write_failures(output_uri, summary.failures)
    return summary


def _write_failures(output_uri: str, failures: list[tuple[str, int, str]]) -> None:
    """``_failures.jsonl`` in the output folder: one line per image that failed
    in this run (none: the file is removed, so it never tells of an older run)."""
    fs, root = filesystem(output_uri)
    path = f"{root}/{FAILURES_NAME}"
    if not failures:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
        return
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(path) as out:
        for source, status, message in failures:
            line = {"path": source, "status": status, "message": message}
            out.write((json.dumps(line) + "\n").encode())


def iter_failures(output_uri: str) -> Iterator[dict[str, Any]]:
    """The failures report of the last run into ``output_uri``."""
    fs, root = filesystem(output_uri)
    path = f"{root}/{FAILURES_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return
    with fs.open_input_stream(path) as stream:
        for line in stream.read().decode().splitlines():
            yield json.loads(line)


def report(summary: Summary, output_uri: str) -> str:
    """The summary a person reads at the end of a run."""
    lines = [
        f"{summary.done} done, {summary.skipped} already there, {summary.failed} failed "
        f"in {summary.seconds:.1f}s (first results at {summary.first_results_s:.1f}s): "
        f"{summary.images_per_s:.2f} images/s, {summary.megapixels_per_s:.2f} MP/s"
        + (
            f" ({summary.steady_images_per_s:.2f} images/s once under way)"
            if summary.steady_images_per_s
            else ""
        )
        + f" -> {output_uri}"
    ]
    for actor, (first, peak) in sorted(summary.actor_rss_mib.items()):
        lines.append(
            f"  actor {actor[-8:]}: RSS {first:.0f} MiB after its first batch, peak {peak:.0f} MiB"
        )
    if summary.failures:
        lines.append(f"  failures: {filesystem(output_uri)[1]}/{FAILURES_NAME}")
        for source, status, message in summary.failures[:10]:
            lines.append(f"  FAILED {source}: {status} {message}")
        if len(summary.failures) > 10:
            lines.append(f"  ... and {len(summary.failures) - 10} more")
    return "\n".join(lines)


def main_run(input_uri: str, output_uri: str, config: BulkConfig, address: str | None) -> int:
    """The ``rembg-serve batch`` command: connects to a cluster or starts one."""
    if "://" not in input_uri and not glob.has_magic(input_uri) and not Path(input_uri).exists():
        raise FileNotFoundError(f"no such file or folder: {input_uri}")
    if address is None:
        # On this machine the actors find the model where this process does: a
        # missing one is said now, not as an actor's failure after Ray started.
        model = _model_config(config)
        resolve_model_file(model.name, model.path)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        summary = run(input_uri, output_uri, config)
    finally:
        if started_here:
            ray.shutdown()
    print(report(summary, output_uri))
    return 1 if summary.failed else 0
