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

Per fidelity (``fidelity``: exact, rembg's pixels; fast, deployments/fast.py),
the ingress's default JPEG -> PNG path as the service runs it (decode, resize,
mask upscale, the one-pass cut-out writer), each stage of both timed in turn in
every repeat beside Pillow's decode, so that the two columns share one machine
state.

Then the same JPEGs through `serve run` (``served``) with a stand-in model (a
graph of u2netp's shapes that costs nothing, generated here, never shipped): the
CPU each process of the service spent per image (Linux /proc), uploads at
concurrency 2, exact and fast in turn (the request's ``fidelity``), so that
Serve's own share shows: the proxy's, and the ingress's beyond the stages it
runs. A tiny image gives the fixed cost of a request.
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

from deployments import fast
from deployments.bench.harness import (
    Json,
    cpu_seconds,
    free_port,
    proxies,
    running_service,
    serve_config,
    serve_replicas,
    session_processes,
)
from deployments.compose import RefineLimits, compose, mask_to_size, naive_cutout_png
from deployments.decode import Limits, decode, probe
from deployments.encode import encode
from deployments.infer import OnnxModel
from deployments.memory import reuse_image_memory
from deployments.models import resolve_model_file, spec_for
from deployments.options import CutoutOptions, Fidelity, OutputFormat
from deployments.pipeline import finish, prepare
from deployments.preprocess import model_input, normalize_batch
from deployments.runtime import RuntimeConfig
from deployments.settings import AppSettings

T = TypeVar("T")

MEGAPIXELS = (0.5, 1.0, 2.0, 12.0, 24.0)
QUICK_MEGAPIXELS = (0.5, 2.0)
FIDELITIES: tuple[Fidelity, ...] = ("exact", "fast")
# The ingress's default path per fidelity, as finish() runs it: the cut-out is
# composed and encoded in one pass (compose.naive_cutout_png).
FIDELITY_PATH = ("decode", "resize", "mask_upscale", "cutout_png")
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
SERVED = {0.02: 24, 1.0: 24, 2.0: 24, 12.0: 8}
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
        "fidelity": fidelity_paths(model, data, repeats),
    }


def interleaved_cpu_ms(works: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The median CPU milliseconds of each of ``works``, each repeat running every
    one of them once in turn (so that a busy spell of the machine falls on all)."""
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            started = time.process_time()
            work()
            times[name].append((time.process_time() - started) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def fidelity_paths(model: OnnxModel, data: bytes, repeats: int) -> Json:
    """The ingress's default path (decode, resize, mask upscale, cut-out to PNG) per
    fidelity, CPU ms per megapixel and its ratio to Pillow's decode of ``data``,
    every stage of both and the decode timed in turn in each repeat."""
    limits = Limits()
    image = decode(data, limits)
    mask = model.predict([model_input(image, model.spec.size)])[0]
    upscale = {"exact": mask_to_size, "fast": fast.mask_to_size}
    alpha = {f: upscale[f](mask, image.size) for f in FIDELITIES}
    works: dict[str, Callable[[], object]] = {
        "pillow_decode": partial(_pillow_decode, data),
        "decode": partial(decode, data, limits),
        "resize": partial(model_input, image, model.spec.size),
    }
    for f in FIDELITIES:
        works[f"mask_upscale {f}"] = partial(upscale[f], mask, image.size)
        if image.mode == "RGB":
            works[f"cutout_png {f}"] = partial(naive_cutout_png, image, alpha[f])
        else:  # finish() composes, then encodes
            works[f"cutout_png {f}"] = partial(_compose_encode, image, alpha[f])
    spent = interleaved_cpu_ms(works, repeats)
    actual = image.width * image.height / 1e6
    yardstick = spent["pillow_decode"] / actual
    out: Json = {"pillow_decode_ms_per_mp": round(yardstick, 2)}
    for f in FIDELITIES:
        per = {s: spent.get(f"{s} {f}", spent.get(s, 0.0)) / actual for s in FIDELITY_PATH}
        total = sum(per.values())
        out[f] = {
            "ms_per_mp": {s: round(v, 2) for s, v in per.items()},
            "x_pillow_decode": {s: round(v / yardstick, 2) for s, v in per.items()},
            "total_ms_per_mp": round(total, 2),
            "total_x_pillow_decode": round(total / yardstick, 2),
        }
    return out


def _compose_encode(image: Image.Image, alpha: Image.Image) -> bytes:
    return encode(compose(image, alpha, CutoutOptions(), RefineLimits()), "png")


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


def standin_model(directory: Path) -> Path:
    """An ONNX graph of u2netp's shapes, (N, 3, 320, 320) -> (N, 1, 320, 320), that
    costs nothing: the image's brightest channel above the mean, a sharp mask with
    edges like a real one's. For the benchmark only, written to ``directory``."""
    import onnx
    from onnx import TensorProto, helper

    shape: list[int | str] = ["batch", 3, 320, 320]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 320, 320])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["top"], axes=[1], keepdims=1),
        helper.make_node("Greater", ["top", "zero"], ["inside"]),
        helper.make_node("Cast", ["inside"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "standin", [x], [y], initializer=[zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = directory / "standin-u2netp.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def served(
    tmp: Path, model: OnnxModel, base: Image.Image, uploads: dict[float, int], repeats: int
) -> Json:
    """CPU per image of Serve's proxy, the ingress and the model replica, through
    `serve run serve_config.yaml` (refinement warm-up off: it would run beside;
    u2netp's file replaced by ``standin_model``, so that the service's own work is
    what is left), for JPEGs of ``uploads``' sizes, each sent that many times per
    fidelity at concurrency 2 after two unmeasured, exact and fast in turn in two
    rounds; beside it the same file's in-process stages."""
    standin = standin_model(tmp)
    args = {"refine_warmup": "off", "models": [{"name": "u2netp", "path": str(standin)}]}
    config = serve_config(free_port(), args=args)
    rows = []
    with running_service(tmp, config) as service:
        replicas = serve_replicas(service.process.pid)
        pids = {
            "proxy": proxies(service.process.pid),
            "ingress": [p for p, n in replicas.items() if n == "Ingress"],
            "model": [p for p, n in replicas.items() if n.startswith("Model_")],
        }
        # Every other process of the service: Ray's controller, GCS, raylet, `serve run`.
        known = {pid for group in pids.values() for pid in group}
        pids["ray"] = [p for p in session_processes(service.process.pid) if p not in known]
        for megapixels, count in uploads.items():
            data = make_input(base, megapixels, "jpeg")

            def send(times: int, fidelity: Fidelity, data: bytes = data) -> None:
                with service.client(timeout=120) as client:
                    for _ in range(times):
                        response = client.post(
                            "/remove", content=data, params={"fidelity": fidelity}
                        )
                        response.raise_for_status()

            # CPU seconds per process and uploads, per fidelity.
            spent = {f: dict.fromkeys(pids, 0.0) for f in FIDELITIES}
            sent = dict.fromkeys(FIDELITIES, 0)
            for f in FIDELITIES:
                send(2, f)
            each = max(1, count // 4)  # per client, per round: two rounds of two clients
            for _ in range(2):
                for f in FIDELITIES:
                    before = _process_cpu(pids)
                    with ThreadPoolExecutor(2) as pool:
                        list(pool.map(partial(send, fidelity=f), [each, each]))
                    for k, v in _process_cpu(pids).items():
                        spent[f][k] += v - before[k]
                    sent[f] += 2 * each
            local = measure_one(model, data, repeats)
            actual = local["megapixels"]
            yardstick = local["fidelity"]["pillow_decode_ms_per_mp"]
            for f in FIDELITIES:
                per_image = {k: v * 1000 / sent[f] for k, v in spent[f].items()}
                stages_ms = local["fidelity"][f]["total_ms_per_mp"] * actual
                outside = per_image["proxy"] + per_image["ingress"]
                rows.append(
                    {
                        "megapixels": actual,
                        "fidelity": f,
                        "uploads": sent[f],
                        "cpu_ms_per_image": {k: round(v, 1) for k, v in per_image.items()},
                        "ingress_stages_ms_per_image": round(stages_ms, 1),
                        "serve_share_ms_per_image": round(outside - stages_ms, 1),
                        "outside_model_ms_per_mp": round(outside / actual, 2),
                        "pillow_decode_ms_per_mp": yardstick,
                        "outside_model_x_pillow_decode": round(outside / actual / yardstick, 2),
                    }
                )
    return {"model": "stand-in (u2netp's shapes, no work)", "rows": rows}


def u2netp() -> OnnxModel:
    """The embedded u2netp on one thread, batches of one."""
    return OnnxModel(
        resolve_model_file("u2netp"), spec_for("u2netp"), RuntimeConfig(intra_op_threads=1), 1
    )


def run_section(tmp: Path, images: dict[str, bytes], quick: bool) -> Json:
    photo = images.get("car-1.jpg") or next(iter(images.values()))
    with Image.open(io.BytesIO(photo)) as source:
        base = source.convert("RGB")
    model = u2netp()
    reuse_image_memory(AppSettings().pixel_budget)  # the stages run as the ingress runs them
    repeats = 1 if quick else 5
    print("stages: CPU per megapixel of each stage ...", flush=True)
    results = measure(model, base, QUICK_MEGAPIXELS if quick else MEGAPIXELS, repeats)
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
    served_worst = {
        f: max(r["outside_model_x_pillow_decode"] for r in served_rows if r["fidelity"] == f)
        for f in FIDELITIES
    }
    # The fidelity goals are set at 1 MP (absent from a quick run: SKIP).
    one_mp = [r for r in jpeg if abs(r["megapixels"] - 1.0) < 0.05]
    served_one = [r for r in served_rows if abs(r["megapixels"] - 1.0) < 0.05]

    def at_one(rows: list[Json], key: Callable[[Json], float]) -> float | None:
        return key(rows[0]) if rows else None

    return [
        ("stages JPEG->PNG CPU/MP / Pillow decode", worst, "<=", None),
        ("served JPEG->PNG CPU/MP outside model / decode", served_worst["exact"], "<=", 5.5),
        (
            "stages exact 1MP JPEG->PNG / decode",
            at_one(one_mp, lambda r: r["fidelity"]["exact"]["total_x_pillow_decode"]),
            "<=",
            None,
        ),
        (
            "stages fast 1MP JPEG->PNG / decode",
            at_one(one_mp, lambda r: r["fidelity"]["fast"]["total_x_pillow_decode"]),
            "<=",
            3.5,
        ),
        (
            "served fast 1MP JPEG->PNG / decode",
            at_one(
                [r for r in served_one if r["fidelity"] == "fast"],
                lambda r: r["outside_model_x_pillow_decode"],
            ),
            "<=",
            5.0,
        ),
        ("served fast JPEG->PNG worst / decode", served_worst["fast"], "<=", None),
    ]


def _pair(exact: float, fast: float, width: int) -> str:
    return f"{exact} | {fast}".rjust(width)


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
    lines += [
        "",
        "fidelity: the ingress's default path (one-pass cut-out), CPU ms per megapixel,"
        " x Pillow decode; exact | fast",
        f"{'input':9}{'MP':>6}{'pillow':>8}"
        + "".join(f"{s[:12]:>14}" for s in FIDELITY_PATH)
        + f"{'total':>14}{'x dec':>13}",
    ]
    for r in results["rows"]:
        fid = r["fidelity"]
        exact, quick = fid["exact"], fid["fast"]
        lines.append(
            f"{r['input']:9}{r['megapixels']:>6}{fid['pillow_decode_ms_per_mp']:>8}"
            + "".join(
                _pair(exact["ms_per_mp"][s], quick["ms_per_mp"][s], 14) for s in FIDELITY_PATH
            )
            + _pair(exact["total_ms_per_mp"], quick["total_ms_per_mp"], 14)
            + _pair(exact["total_x_pillow_decode"], quick["total_x_pillow_decode"], 13)
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
        "served: JPEG -> PNG through serve run, a stand-in model, CPU ms per image"
        " (uploads at concurrency 2)",
        f"{'MP':>6}{'fidelity':>9}{'proxy':>8}{'ingress':>9}{'model':>8}{'ray':>7}{'stages':>8}"
        f"{'serve':>7}{'out/MP':>8}{'x dec':>7}",
    ]
    for r in results["served"]["rows"]:
        cpu = r["cpu_ms_per_image"]
        lines.append(
            f"{r['megapixels']:>6}{r['fidelity']:>9}{cpu['proxy']:>8}{cpu['ingress']:>9}"
            f"{cpu['model']:>8}{cpu.get('ray', '-'):>7}"
            f"{r['ingress_stages_ms_per_image']:>8}{r['serve_share_ms_per_image']:>7}"
            f"{r['outside_model_ms_per_mp']:>8}{r['outside_model_x_pillow_decode']:>7}"
        )
    return lines
