"""Bulk mode: a folder or bucket of images through the same stages and model, on Ray Data.

rembg-serve batch photos/ cutouts/ --model u2netp

``bulk_plan.plan`` lists the inputs and maps each to its output, the folders kept
(as ``rembg-serve remove`` does, same-named files apart), leaving out those already
written: a rerun resumes. ``run`` then streams the rest, as batches of file names,
to an autoscaling Ray Data actor pool of ``Cutter``: each actor holds one warm
``OnnxModel`` and runs the service's stages (``deployments.pipeline``) around it,
read + decode + resize -> the model, on the batch -> compose + encode + write, so
that a cut-out is the endpoint's, pixel for pixel, and nothing but names and
results crosses Ray's object store. Each output is written under a temporary name
and renamed: a killed run never leaves a half-written file. An image that cannot
be read, decoded or served becomes a line of the failures report
(``bulk_report``), never an error of the run. One run at a time per output folder.

Paths are local, or any URI pyarrow's filesystems open (``s3://``, ``gs://``,
``abfs://``, ``hdfs://``), each node reading and writing directly.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.fs as pafs
import ray
from ray.data import ActorPoolStrategy, DataContext

from deployments.admission import PixelBudget
from deployments.bulk_plan import Plan, budget_groups, filesystem, plan
from deployments.bulk_report import Summary, report, write_failures
from deployments.decode import Limits, probe
from deployments.errors import ModelUnavailable, PayloadTooLarge, ServiceError
from deployments.files import write_atomic
from deployments.memory import reuse_image_memory, rss_bytes
from deployments.models import MODEL_TABLE, resolve_model_file, spec_for
from deployments.options import CutoutOptions, Fidelity, OutputFormat
from deployments.pipeline import ImageSettings, Prepared, finish, prepare
from deployments.runtime import use_gpu_for
from deployments.settings import AppSettings, LiveModelConfig, ModelConfig

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Job:
    """What every image of a run gets: the cut-out, its format, how it is decoded
    and finished."""

    input_uri: str
    output_uri: str
    options: CutoutOptions
    fmt: OutputFormat
    image: ImageSettings


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
        self.budget = PixelBudget(job.image.pixel_budget)
        reuse_image_memory(job.image.pixel_budget)
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
        # The most pixels this call had decoded at once: within what it held.
        decoded = 0
        files: dict[int, bytes] = {}
        for i, source in enumerate(batch["source"]):
            try:
                files[i] = _read(self.source_fs, str(source), job.image.limits)
                width, height = probe(files[i], job.image.limits)
                pixels[i] = width * height
            except Exception as exc:  # one bad file fails alone
                files.pop(i, None)
                status[i], message[i] = _failure(exc)
        # A group at a time, each taking its room in one step: a batch larger
        # than the budget is never decoded all at once.
        ready = list(files)
        for group in budget_groups([int(pixels[i]) for i in ready], self.budget.capacity):
            held = [ready[g] for g in group]
            with self.budget.hold_sync(int(pixels[held].sum())):
                part = {i: files.pop(i) for i in held}
                decoded = max(decoded, self._cut(batch, part, status, message))
        return {
            "source": batch["source"],
            "status": status,
            "message": message,
            "pixels": pixels,
            "actor": np.full(n, self.actor, dtype=object),
            "rss_mib": np.full(n, rss_bytes() / 2**20),
            "decoded": np.full(n, decoded, dtype=np.int64),
        }

    def _cut(
        self,
        batch: dict[str, npt.NDArray[Any]],
        files: dict[int, bytes],
        status: npt.NDArray[np.int16],
        message: npt.NDArray[Any],
    ) -> int:
        """Decode, the model, compose, encode and write; a failure is its image's.
        Returns the pixels decoded at once (all of ``files``' that decoded)."""
        job = self.job
        prepared: dict[int, Prepared] = {}
        for i, data in files.items():
            try:
                prepared[i] = prepare(data, self.model.spec, job.image.limits)
            except Exception as exc:  # one bad file fails alone
                status[i], message[i] = _failure(exc)
        files.clear()
        decoded = sum(p.image.width * p.image.height for p in prepared.values())
        masks: dict[int, npt.NDArray[np.uint8]] = {}
        if prepared:
            try:
                with self.model_lock:
                    found = self.model.predict([p.model_input for p in prepared.values()])
                masks = dict(zip(prepared, found, strict=True))
            except Exception as exc:  # the model's failure is its images', not the run's
                for i in prepared:
                    status[i], message[i] = _failure(exc)
        for i, mask in masks.items():
            try:
                image = prepared.pop(i).image
                body = finish(
                    image,
                    mask,
                    job.options,
                    job.fmt,
                    job.image.png_compress_level,
                    job.image.refine,
                    job.image.fidelity,
                ).body
                del image
                write_atomic(str(batch["target"][i]), body, self.target_fs)
            except Exception as exc:  # one bad image fails alone
                status[i], message[i] = _failure(exc)
        return decoded


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


def model_config(settings: AppSettings, name: str | None) -> ModelConfig:
    """What the actors load for the model a run names (None: the settings' default).

    A dedicated model is its own ``ModelConfig``. A pooled one (``settings.pool``)
    is loaded as a dedicated one would be, with its table entry's constants and
    its file: ``ModelConfig(name=spec_name, path=path)``, as the pool's replicas
    resolve it. Any other name of the model table is that model from rembg's
    store. Raises ``ModelUnavailable`` for a name that is none of these, listing
    the dedicated and pooled ones.
    """
    name = name or settings.default_model_name
    for model in settings.models:
        if model.name == name:
            return model
    for pooled in settings.pool.models if settings.pool else []:
        if pooled.name == name:
            return ModelConfig(name=pooled.spec_name, path=pooled.path)
    if name in MODEL_TABLE:
        return ModelConfig(name=name)
    dedicated = ", ".join(m.name for m in settings.models)
    pooled_names = ", ".join(settings.pooled_names) or "none"
    raise ModelUnavailable(
        f"unknown model {name!r}; dedicated: {dedicated}; pooled: {pooled_names}; "
        f"or any of rembg's: {', '.join(sorted(MODEL_TABLE))}"
    )


def _model_config(config: BulkConfig) -> ModelConfig:
    return model_config(config.settings, config.model)


def _actor_resources(config: BulkConfig) -> tuple[dict[str, float], int]:
    """Ray resources per actor and how many actors at most.

    As in the service, a model copy runs ``num_cpus`` intra-op threads, with a
    ``num_gpus`` share of a card where the cluster has GPUs. On a CPU-only
    cluster an actor asks Ray for no more CPUs than there are.
    """
    cluster = ray.cluster_resources()
    settings = config.settings
    cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    if use_gpu_for(settings.device, gpus):
        most = int(gpus / settings.num_gpus)
        resources = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
    else:
        asked = min(settings.num_cpus, cpus)
        most = int(cpus // asked)
        resources = {"num_cpus": asked}
    return resources, max(1, min(most, config.max_actors or most))


def run(input_uri: str, output_uri: str, config: BulkConfig, work: Plan | None = None) -> Summary:
    """Every image under ``input_uri`` not yet in ``output_uri``, cut out (``work``:
    its plan, if made already); Ray must be initialised (``ray.init``) if there
    is anything to do."""
    model = _model_config(config)
    started = time.perf_counter()
    if work is None:
        work = plan(input_uri, output_uri, "." + config.fmt)
    summary = Summary(skipped=work.skipped)
    for source, status, message in work.refused:
        summary.failed += 1
        summary.failures.append((source, status, message))
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
            image=ImageSettings.of(settings, config.fidelity),
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
    write_failures(output_uri, summary.failures)
    return summary


def main_run(input_uri: str, output_uri: str, config: BulkConfig, address: str | None) -> int:
    """The ``rembg-serve batch`` command: connects to a cluster or starts one."""
    if "://" not in input_uri and not glob.has_magic(input_uri) and not Path(input_uri).exists():
        raise FileNotFoundError(f"no such file or folder: {input_uri}")
    if address is None:
        # On this machine the actors find the model where this process does: a
        # missing one is said now, not as an actor's failure after Ray started.
        model = _model_config(config)
        try:
            resolve_model_file(model.name, model.path)
        except ModelUnavailable as exc:
            asked = config.model or config.settings.default_model_name
            if asked == model.name:
                raise
            raise ModelUnavailable(f"pooled model {asked!r}: {exc}") from exc
    # Planned before Ray starts: a refused run costs no cluster, a finished one
    # needs none.
    work = plan(input_uri, output_uri, "." + config.fmt)
    started_here = bool(work.todo) and not ray.is_initialized()
    if started_here:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        summary = run(input_uri, output_uri, config, work)
    finally:
        if started_here:
            ray.shutdown()
    print(report(summary, output_uri))
    return 1 if summary.failed else 0
