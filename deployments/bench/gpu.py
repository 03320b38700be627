"""One-call benchmark of the GPU path (or the CPU, with --cpu), the model first.

It imports no Ray and no rembg: the service's own stages (``decode``,
``preprocess``, ``pipeline.finish``), session (``infer``) and runtime, so what it
times is what a replica and an ingress run. ``onnx`` is needed only to build the
model variants, which ``--prepare DIR`` can do ahead of time elsewhere. It
measures, in one process:

- the model's images/s by batch size (1, 2, 4, ... up to --max-batch) per model
  variant (fp32; ``pre``: normalisation in the graph; ``fp16``), every shape
  warmed first, the median of --runs timed runs each;
- the CPU-side work of the service per image (decode, resize, normalise, mask
  upscale, cut-out, PNG) in a thread pool over all cores;
- the batching gain (best batch vs batch 1);
- a loop doing what ``rembg.remove`` does, one image at a time, on a session
  made rembg's way (default options, no arena cap, PNG at Pillow's level 6).

It prints the device, the onnxruntime version and the active provider, then a
short table last, and writes JSON to ``--out``.

    python -m deployments.bench.gpu                  # on a GPU machine
    python -m deployments.bench.gpu --quick --cpu    # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from deployments.decode import Limits, decode
from deployments.infer import OnnxModel, masks_from_output
from deployments.models import EMBEDDED, MODEL_TABLE, ModelSpec
from deployments.options import CutoutOptions
from deployments.pipeline import finish
from deployments.preprocess import model_input, normalize_batch
from deployments.runtime import CUDA, RuntimeConfig

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
VARIANTS = ("fp32", "pre", "fp16")
LIMITS = Limits()


@dataclass
class VariantResult:
    name: str
    provider: str
    load_s: float
    warmup_s: float
    batchable: bool
    # Batch size -> images/s (median run).
    images_per_s: dict[int, float] = field(default_factory=dict)
    device_mem_mib: float | None = None
    error: str | None = None

    @property
    def batch_gain(self) -> float | None:
        if 1 not in self.images_per_s:
            return None
        return max(self.images_per_s.values()) / self.images_per_s[1]


@dataclass
class Report:
    device: str
    onnxruntime: str
    available_providers: list[str]
    cpu_cores: int
    model: str
    variants: list[VariantResult]
    cpu_side_images_per_s: float = 0.0
    cpu_side_ms_per_image: dict[str, float] = field(default_factory=dict)
    normalize_ms_per_image: float = 0.0
    rembg_loop_images_per_s: float = 0.0
    rembg_loop_provider: str = ""


def _load_cuda_libraries() -> None:
    # onnxruntime-gpu finds cuDNN/cuBLAS through the loader; torch's wheels
    # bring them (site-packages/nvidia/*/lib) and importing torch loads them.
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()


def device_name(gpu: bool) -> str:
    if gpu:
        try:
            import torch  # type: ignore[import-not-found,unused-ignore]

            return str(torch.cuda.get_device_name(0))
        except (ImportError, RuntimeError, AssertionError) as exc:
            # No torch, or torch without a usable CUDA device: say so, go on.
            return f"gpu (name unknown: {type(exc).__name__})"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def device_used_mib() -> float | None:
    """Device memory in use (MiB), or None without a GPU or torch."""
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return float(total - free) / 2**20


def fixture_images(folder: Path, n: int) -> list[bytes]:
    """``n`` encoded images, cycling over the JPEGs in ``folder``."""
    files = sorted(folder.glob("*.jpg"))
    if not files:
        raise SystemExit(f"no .jpg images in {folder}")
    data = [f.read_bytes() for f in files]
    return [data[i % len(data)] for i in range(n)]


def median_seconds(fn: Callable[[], object], runs: int, min_s: float) -> float:
    """Median wall time of ``fn``: at least ``runs`` runs and ``min_s`` seconds."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < runs or time.perf_counter() - started < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_variant(
    name: str,
    path: Path,
    spec: ModelSpec,
    runtime: RuntimeConfig,
    inputs: Sequence[npt.NDArray[np.uint8]],
    max_batch: int,
    runs: int,
    min_s: float,
) -> VariantResult:
    before = device_used_mib()
    try:
        model = OnnxModel(path, spec, runtime, max_batch)
    except Exception as exc:
        return VariantResult(name, "-", 0.0, 0.0, False, error=f"{type(exc).__name__}: {exc}")
    after = device_used_mib()
    result = VariantResult(
        name,
        model.provider,
        model.report.load_s,
        model.report.warmup_s,
        model.batchable,
        device_mem_mib=None if before is None or after is None else after - before,
    )
    for n in model.buckets:
        feed = {model.input_name: model.model_input([inputs[i % len(inputs)] for i in range(n)])}

        def run(feed: dict[str, npt.NDArray[Any]] = feed) -> object:
            return model.session.run(None, feed)

        result.images_per_s[n] = n / median_seconds(run, runs, min_s)
    return result


def variant_sources(
    spec: ModelSpec, model_path: Path, models_dir: Path | None, wanted: Sequence[str]
) -> dict[str, tuple[Path, bool, bool]]:
    """Per variant: (file, fp16 rewrite, preprocessing rewrite) to load it with."""
    if models_dir is not None:
        # Made by --prepare: already rewritten, so no onnx is needed to load them.
        return {v: (models_dir / f"{spec.name}.{v}.onnx", False, False) for v in wanted}
    flags = {"fp32": (False, False), "pre": (False, True), "fp16": (True, False)}
    return {v: (model_path, *flags[v]) for v in wanted}


def prepare(spec: ModelSpec, model_path: Path, folder: Path) -> list[Path]:
    """Write every variant's rewritten file to ``folder`` (needs onnx)."""
    from deployments.graph import model_bytes_for, to_fp16, with_preprocessing

    folder.mkdir(parents=True, exist_ok=True)
    fp32 = model_bytes_for(model_path, spec, RuntimeConfig())
    files = {
        "fp32": fp32,
        "pre": with_preprocessing(fp32, spec),
        "fp16": to_fp16(fp32),
    }
    written = []
    for variant, data in files.items():
        target = folder / f"{spec.name}.{variant}.onnx"
        target.write_bytes(data)
        written.append(target)
    return written


def cpu_side(
    datas: Sequence[bytes],
    spec: ModelSpec,
    mask: npt.NDArray[np.uint8],
    threads: int,
) -> tuple[float, dict[str, float]]:
    """images/s of the service's CPU work with ``threads`` workers, and its ms
    per image by step (measured once, single-threaded, on the first images)."""

    def one(data: bytes) -> int:
        img = decode(data, LIMITS)
        small = model_input(img, spec.size)
        normalize_batch([small], spec)
        return len(finish(img, mask, CutoutOptions()).body)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, datas[:threads]))  # warm the pool and Pillow's codecs
        started = time.perf_counter()
        list(pool.map(one, datas))
        rate = len(datas) / (time.perf_counter() - started)

    steps = dict.fromkeys(("decode", "resize", "normalize", "upscale+cutout+png"), 0.0)
    sample = datas[: min(len(datas), 8)]
    for data in sample:
        t0 = time.perf_counter()
        img = decode(data, LIMITS)
        t1 = time.perf_counter()
        small = model_input(img, spec.size)
        t2 = time.perf_counter()
        normalize_batch([small], spec)
        t3 = time.perf_counter()
        finish(img, mask, CutoutOptions())
        t4 = time.perf_counter()
        for step, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[step] += seconds * 1000 / len(sample)
    return rate, steps


def rembg_loop(
    datas: Sequence[bytes], spec: ModelSpec, model_path: Path, gpu: bool
) -> tuple[float, str]:
    """images/s of rembg.remove's way: one image at a time, session as rembg makes it."""
    # rembg's BaseSession: default SessionOptions, the CUDA provider with no
    # options (no arena cap, ORT's default cuDNN search), the file as it is.
    providers = [CUDA, "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    session = ort.InferenceSession(
        str(model_path), sess_options=ort.SessionOptions(), providers=providers
    )
    input_name = session.get_inputs()[0].name

    def remove(data: bytes) -> bytes:
        img = decode(data, LIMITS)
        batch = normalize_batch([model_input(img, spec.size)], spec)
        pred = session.run(None, {input_name: batch})[spec.output][:, 0, :, :]
        mask = masks_from_output(pred, spec)[0]
        # rembg saves with Pillow's default PNG level (6).
        return finish(img, mask, CutoutOptions(), "png", png_compress_level=6).body

    remove(datas[0])  # rembg's first call pays the cuDNN search too; not timed
    started = time.perf_counter()
    for data in datas:
        remove(data)
    return len(datas) / (time.perf_counter() - started), session.get_providers()[0]


def table(report: Report) -> str:
    lines = [
        f"device: {report.device}",
        f"onnxruntime {report.onnxruntime}; model {report.model}",
        "",
        f"{'variant':<8}{'provider':<24}{'batch':>6}{'img/s':>10}",
    ]
    for v in report.variants:
        if v.error:
            lines.append(f"{v.name:<8}{'FAILED':<24} {v.error[:60]}")
            continue
        for n, rate in v.images_per_s.items():
            lines.append(f"{v.name:<8}{v.provider:<24}{n:>6}{rate:>10.1f}")
        mem = "-" if v.device_mem_mib is None else f"{v.device_mem_mib:.0f} MiB"
        gain = v.batch_gain
        lines.append(
            f"{v.name:<8}batching gain x{gain or 0:.2f}, device memory {mem}, "
            f"warm-up {v.warmup_s:.1f}s"
        )
    steps = ", ".join(f"{k} {ms:.1f}" for k, ms in report.cpu_side_ms_per_image.items())
    lines += [
        "",
        f"CPU side, {report.cpu_cores} threads: {report.cpu_side_images_per_s:.1f} img/s"
        f" (ms/image, one thread: {steps})",
        f"rembg-style remove() loop on {report.rembg_loop_provider}: "
        f"{report.rembg_loop_images_per_s:.1f} img/s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU provider (no GPU here)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny counts")
    parser.add_argument("--model", default="u2netp", choices=sorted(MODEL_TABLE))
    parser.add_argument("--model-path", type=Path, help="default: the embedded u2netp")
    parser.add_argument("--models-dir", type=Path, help="variants written by --prepare")
    parser.add_argument("--prepare", type=Path, help="write the variants here and exit")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=256, help="for the CPU side")
    parser.add_argument("--rembg-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "gpu.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_batch, args.runs, args.min_seconds = min(args.max_batch, 2), 1, 0.0
        args.images, args.rembg_images = min(args.images, 4), min(args.rembg_images, 1)

    spec = MODEL_TABLE[args.model]
    model_path = args.model_path or EMBEDDED.get(args.model)
    if model_path is None:
        raise SystemExit(f"--model-path is needed for {args.model}")
    if args.prepare is not None:
        for written in prepare(spec, model_path, args.prepare):
            print(written)
        return Report("", ort.__version__, [], 0, spec.name, [])

    gpu = not args.cpu
    if gpu:
        _load_cuda_libraries()
    datas = fixture_images(args.fixtures, args.images)
    inputs = [model_input(decode(d, LIMITS), spec.size) for d in datas[:4]]
    report = Report(
        device=device_name(gpu),
        onnxruntime=ort.__version__,
        available_providers=ort.get_available_providers(),
        cpu_cores=args.threads,
        model=spec.name,
        variants=[],
    )
    print(f"device: {report.device}; onnxruntime {report.onnxruntime}", flush=True)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name, (path, fp16, pre) in variant_sources(
        spec, model_path, args.models_dir, wanted
    ).items():
        runtime = RuntimeConfig(
            use_gpu=gpu,
            # One session per process here: the whole card, as a 1.0 fraction.
            intra_op_threads=1 if gpu else args.threads,
            fp16=fp16,
            preprocess_in_graph=pre,
        )
        result = bench_variant(
            name, path, spec, runtime, inputs, args.max_batch, args.runs, args.min_seconds
        )
        print(f"{name}: provider {result.provider}, {result.error or 'ok'}", flush=True)
        report.variants.append(result)

    mask = masks_from_output(
        np.random.default_rng(0).standard_normal((1, *spec.size[::-1]), dtype=np.float32),
        spec,
    )[0]
    report.cpu_side_images_per_s, report.cpu_side_ms_per_image = cpu_side(
        datas, spec, mask, args.threads
    )
    report.normalize_ms_per_image = report.cpu_side_ms_per_image.get("normalize", 0.0)
    report.rembg_loop_images_per_s, report.rembg_loop_provider = rembg_loop(
        datas[: args.rembg_images], spec, model_path, gpu
    )

    payload = asdict(report)
    for v, raw in zip(report.variants, payload["variants"], strict=True):
        raw["batch_gain"] = v.batch_gain
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print()
    print(table(report))
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
