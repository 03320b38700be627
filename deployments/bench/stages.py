"""The CPU each stage outside the model costs, per megapixel, against Pillow's decode.

For JPEG, PNG and RGBA-PNG inputs at 0.5, 2, 12 and 24 megapixels (car-1.jpg
resized), this process's CPU time (``time.process_time``: every thread's) of each
stage the service runs around the model, median of ``repeats``:

- per input: decode, resize to the model's input, normalise (the model replica's
  share), mask upscale;
- per output: compose and encode, for the default PNG cut-out, ``only_mask``,
  ``bgcolor`` and WebP.

The yardstick is Pillow's own decode of the same file (``Image.open`` + ``load``):
dividing by it makes the figure comparable across machines. The mask is the
model's own for that image.

Then the same JPEGs through `serve run` (``served``): the CPU each process of the
service spent per image (Linux /proc), uploads at concurrency 2, so that Serve's
own share shows: the proxy's, and the ingress's beyond the stages it runs. A
tiny image gives the fixed cost of a request.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from deployments.bench.harness import (
    Json,
    cpu_seconds,
    free_port,
    proxies,
    running_service,
    serve_config,
    serve_replicas,
)
from deployments.compose import RefineLimits, compose, mask_to_size
from deployments.decode import Limits, decode, probe
from deployments.encode import encode
from deployments.infer import OnnxModel
from deployments.memory import reuse_image_memory
from deployments.models import resolve_model_file, spec_for
from deployments.options import CutoutOptions, OutputFormat
from deployments.pipeline import finish, prepare
from deployments.preprocess import model_input, normalize_batch
from deployments.runtime import RuntimeConfig
from deployments.settings import AppSettings

T = TypeVar("T")

MEGAPIXELS = (0.5, 2.0, 12.0, 24.0)
INPUTS = ("jpeg", "png", "rgba-png")
OUTPUTS: dict[str, tuple[CutoutOptions, OutputFormat]] = {
    "png": (CutoutOptions(), "png"),
    "only_mask": (CutoutOptions(only_mask=True), "png"),
    "bgcolor": (CutoutOptions(bgcolor=(255, 255, 255, 255)), "png"),
    "webp": (CutoutOptions(), "webp"),
}
# The stages of the default JPEG -> PNG path, in order.
DEFAULT_PATH = ("decode", "resize", "normalise", "mask_upscale", "compose", "encode")
# Of those, the ones the ingress runs (the model replica normalises).
INGRESS_STAGES = ("decode", "resize", "mask_upscale", "compose", "encode")
# Through `serve run`: JPEG megapixels -> uploads timed (a tiny image: the fixed cost).
SERVED = {0.02: 24, 2.0: 24, 12.0: 8}
SERVED_QUICK = {0.02: 8, 2.0: 8}
# Threads of the ingress's work in one process (os.cpu_count() added where larger).
THREADS = tuple(sorted({1, 2, os.cpu_count() or 1}))


def make_input(photo: Image.Image, megapixels: float, kind: str) -> bytes:
    """``photo`` resized to ``megapixels`` (4:3), as a file of ``kind``."""
    width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    img = photo.resize((width, round(width * 3 / 4)), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if kind == "jpeg":
        img.save(out, "JPEG", quality=90)
    elif kind == "png":
        img.save(out, "PNG")
    else:
        rgba = img.convert("RGBA")
        rgba.putalpha(img.convert("L"))
        rgba.save(out, "PNG")
    return out.getvalue()


def cpu_ms(work: Callable[[], T], repeats: int) -> tuple[float, T]:
    """The median CPU milliseconds of ``work()`` over ``repeats`` runs, and its result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.process_time()
        result = work()
        times.append((time.process_time() - started) * 1000)
    assert result is not None
    return statistics.median(times), result


def _pillow_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img


def measure_one(model: OnnxModel, data: bytes, repeats: int) -> Json:
    """One input file: CPU ms per megapixel of each stage, and of each output's."""
    spec, limits = model.spec, Limits()
    yardstick, _ = cpu_ms(partial(_pillow_decode, data), repeats)
    stages: dict[str, float] = {}
    stages["decode"], image = cpu_ms(partial(decode, data, limits), repeats)
    stages["resize"], small = cpu_ms(partial(model_input, image, spec.size), repeats)
    stages["normalise"], _ = cpu_ms(partial(normalize_batch, [small], spec), repeats)
    mask = model.predict([small])[0]
    stages["mask_upscale"], full = cpu_ms(partial(mask_to_size, mask, image.size), repeats)
    outputs: dict[str, float] = {}
    for name, (options, fmt) in OUTPUTS.items():
        composed, cutout = cpu_ms(partial(compose, image, full, options, RefineLimits()), repeats)
        encoded, _ = cpu_ms(partial(encode, cutout, fmt), repeats)
        outputs[name] = composed + encoded
        if name == "png":
            stages["compose"], stages["encode"] = composed, encoded
    actual = image.width * image.height / 1e6
    per_mp = {k: round(v / actual, 2) for k, v in stages.items()}
    total = sum(per_mp[s] for s in DEFAULT_PATH)
    return {
        "megapixels": round(actual, 2),
        "bytes": len(data),
        "pillow_decode_ms_per_mp": round(yardstick / actual, 2),
        "default_ms_per_mp": per_mp,
        "default_total_ms_per_mp": round(total, 2),
        "default_total_x_pillow_decode": round(total / (yardstick / actual), 2),
        "outputs_ms_per_mp": {name: round(v / actual, 2) for name, v in outputs.items()},
    }


def measure(
    model: OnnxModel, base: Image.Image, megapixels: tuple[float, ...], repeats: int
) -> Json:
    """CPU ms per megapixel of each stage, for every input kind and size."""
    rows = [
        {"input": kind, **measure_one(model, make_input(base, mp, kind), repeats)}
        for kind in INPUTS
        for mp in megapixels
    ]
    return {"repeats": repeats, "rows": rows}


def thread_scaling(model: OnnxModel, data: bytes, images: int, threads: tuple[int, ...]) -> Json:
    """Images/s of the ingress's own work (decode, resize, mask upscale, compose,
    encode: everything but the model, whose mask for this image is computed once)
    on 1..n threads of one process, as the ingress's pool runs it. What a node
    whose model is nearly free (a GPU) would get from one ingress process; the
    CPU/wall ratio says how many cores the threads kept busy (the rest: the GIL
    and memory bandwidth)."""
    limits = Limits()
    mask = model.predict([prepare(data, model.spec, limits).model_input])[0]
    options = CutoutOptions()

    def one(_: int) -> int:
        prepared = prepare(data, model.spec, limits)
        return len(finish(prepared.image, mask, options).body)

    rows = []
    for n in threads:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, range(n)))  # warm: every thread's first buffers
            wall, cpu = time.perf_counter(), time.process_time()
            list(pool.map(one, range(images)))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rate, busy = round(images / wall, 2), round(cpu / wall, 2)
        rows.append({"threads": n, "images_per_s": rate, "cores_busy": busy})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = round(row["images_per_s"] / base, 2)
    width, height = probe(data, limits)
    return {"megapixels": round(width * height / 1e6, 2), "images": images, "rows": rows}


def _process_cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}


def served(
    tmp: Path, model: OnnxModel, base: Image.Image, uploads: dict[float, int], repeats: int
) -> Json:
    """CPU per image of Serve's proxy, the ingress and the model replica, through
    `serve run serve_config.yaml` (refinement warm-up off: it would run beside),
    for JPEGs of ``uploads``' sizes, each sent that many times at concurrency 2
    after two unmeasured; beside it the same file's in-process stages."""
    config = serve_config(free_port(), args={"refine_warmup": "off"})
    rows = []
    with running_service(tmp, config) as service:
        replicas = serve_replicas(service.process.pid)
        pids = {
            "proxy": proxies(service.process.pid),
            "ingress": [p for p, n in replicas.items() if n == "Ingress"],
            "model": [p for p, n in replicas.items() if n.startswith("Model_")],
        }
        for megapixels, count in uploads.items():
            data = make_input(base, megapixels, "jpeg")

            def send(times: int, data: bytes = data) -> None:
                with service.client(timeout=120) as client:
                    for _ in range(times):
                        response = client.post("/remove", content=data)
                        response.raise_for_status()

            send(2)
            before = _process_cpu(pids)
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(send, [count // 2, count - count // 2]))
            spent = {k: (v - before[k]) * 1000 / count for k, v in _process_cpu(pids).items()}
            local = measure_one(model, data, repeats)
            actual = local["megapixels"]
            stages_ms = sum(local["default_ms_per_mp"][s] for s in INGRESS_STAGES) * actual
            outside = spent["proxy"] + spent["ingress"]
            rows.append(
                {
                    "megapixels": actual,
                    "uploads": count,
                    "cpu_ms_per_image": {k: round(v, 1) for k, v in spent.items()},
                    "ingress_stages_ms_per_image": round(stages_ms, 1),
                    "serve_share_ms_per_image": round(outside - stages_ms, 1),
                    "outside_model_ms_per_mp": round(outside / actual, 2),
                    "pillow_decode_ms_per_mp": local["pillow_decode_ms_per_mp"],
                    "outside_model_x_pillow_decode": round(
                        outside / actual / local["pillow_decode_ms_per_mp"], 2
                    ),
                }
            )
    return {"rows": rows}


def run_section(tmp: Path, images: dict[str, bytes], quick: bool) -> Json:
    photo = images.get("car-1.jpg") or next(iter(images.values()))
    with Image.open(io.BytesIO(photo)) as source:
        base = source.convert("RGB")
    model = OnnxModel(
        resolve_model_file("u2netp"), spec_for("u2netp"), RuntimeConfig(intra_op_threads=1), 1
    )
    reuse_image_memory(AppSettings().pixel_budget)  # the stages run as the ingress runs them
    repeats = 1 if quick else 5
    print("stages: CPU per megapixel of each stage ...", flush=True)
    results = measure(model, base, MEGAPIXELS[:2] if quick else MEGAPIXELS, repeats)
    results["threads"] = thread_scaling(
        model, make_input(base, 2.0, "jpeg"), 8 if quick else 40, THREADS
    )
    print("stages: the same JPEGs through serve run ...", flush=True)
    results["served"] = served(tmp, model, base, SERVED_QUICK if quick else SERVED, repeats)
    return results


def targets(results: Json) -> list[tuple[str, float | bool | None, str, float | None]]:
    jpeg = [r for r in results["rows"] if r["input"] == "jpeg"]
    worst = max(r["default_total_x_pillow_decode"] for r in jpeg)
    # Through serve run, Serve included, at the sizes photos have (not the tiny one).
    served_rows = [r for r in results["served"]["rows"] if r["megapixels"] >= 1]
    served_worst = max(r["outside_model_x_pillow_decode"] for r in served_rows)
    return [
        ("stages JPEG->PNG CPU/MP / Pillow decode", worst, "<=", None),
        ("served JPEG->PNG CPU/MP outside model / decode", served_worst, "<=", 5.5),
    ]


def table(results: Json) -> list[str]:
    head = (
        f"{'input':9}{'MP':>6}{'pillow':>8}"
        + "".join(f"{s[:8]:>9}" for s in DEFAULT_PATH)
        + f"{'total':>8}{'x dec':>7}  other outputs (compose+encode)"
    )
    lines = ["", f"stages: CPU ms per megapixel (median of {results['repeats']})", head]
    for r in results["rows"]:
        per: dict[str, Any] = r["default_ms_per_mp"]
        others = ", ".join(f"{k} {v}" for k, v in r["outputs_ms_per_mp"].items() if k != "png")
        lines.append(
            f"{r['input']:9}{r['megapixels']:>6}{r['pillow_decode_ms_per_mp']:>8}"
            + "".join(f"{per[s]:>9}" for s in DEFAULT_PATH)
            + f"{r['default_total_ms_per_mp']:>8}{r['default_total_x_pillow_decode']:>7}  {others}"
        )
    scaling = results["threads"]
    lines += [
        "",
        f"threads: the ingress's work without the model, {scaling['megapixels']} MP JPEG -> PNG,"
        f" {scaling['images']} images",
    ]
    lines += [
        f"  {r['threads']} thread(s): {r['images_per_s']} images/s ({r['speedup']} x),"
        f" cores busy {r['cores_busy']}"
        for r in scaling["rows"]
    ]
    lines += [
        "",
        "served: JPEG -> PNG through serve run, CPU ms per image (uploads at concurrency 2)",
        f"{'MP':>6}{'proxy':>8}{'ingress':>9}{'model':>8}{'stages':>8}{'serve':>7}"
        f"{'out/MP':>8}{'x dec':>7}",
    ]
    for r in results["served"]["rows"]:
        cpu = r["cpu_ms_per_image"]
        lines.append(
            f"{r['megapixels']:>6}{cpu['proxy']:>8}{cpu['ingress']:>9}{cpu['model']:>8}"
            f"{r['ingress_stages_ms_per_image']:>8}{r['serve_share_ms_per_image']:>7}"
            f"{r['outside_model_ms_per_mp']:>8}{r['outside_model_x_pillow_decode']:>7}"
        )
    return lines
