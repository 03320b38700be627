"""Bulk mode against the HTTP path and the model limit, on the same images, in one run.

1. the images: the shared photos resized to 0.3, 0.8 and 1.9 megapixels, as
   JPEGs in five subfolders (``count`` of them, 520 by default);
2. the model limit and the in-process pipeline (the service's stages and model
   class with no Serve), as in the throughput section, on a sample of them;
3. bulk mode: ``deployments.bulk.run`` over all of them on a local Ray, as
   ``rembg-serve batch`` runs it, the model actors' RSS after their first batch
   and at peak;
4. the HTTP path: the service from serve_config.yaml (`serve run`), driven by
   ``rembg-serve remove`` at its best concurrency (probed on a few images first),
   over all of them;

and the bulk outputs compared with the HTTP ones, pixel for pixel.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import ray
from PIL import Image

from deployments.bench.harness import Json, compare, free_port, running_service, serve_config
from deployments.bench.throughput import in_process, model_limit, served_settings
from deployments.bulk import BulkConfig, run
from deployments.bulk_report import Summary
from deployments.cli import remove_all
from deployments.client import AsyncClient, Options, Retry
from deployments.files import plan

SIZES = ((640, 480), (1024, 768), (1600, 1200))
CONCURRENCY_PROBE = (4, 8, 16)


def make_images(directory: Path, sources: Mapping[str, bytes], count: int) -> float:
    """``count`` JPEGs of the shared photos at each of ``SIZES`` in turn, in five
    folders; their megapixels."""
    photos = [Image.open(io.BytesIO(data)).convert("RGB") for data in sources.values()]
    pixels = 0
    for i in range(count):
        width, height = SIZES[(i // len(photos)) % len(SIZES)]
        folder = directory / f"set{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = photos[i % len(photos)].resize((width, height), Image.Resampling.BICUBIC)
        photo.save(folder / f"img{i:05d}.jpg", "JPEG", quality=90)
        pixels += width * height
    return pixels / 1e6


def summary_json(summary: Summary) -> Json:
    """A bulk run's figures, its rates included, without the failures list."""
    out = asdict(summary)
    out.pop("failures")
    out["images_per_s"] = round(summary.images_per_s, 3)
    out["steady_images_per_s"] = round(summary.steady_images_per_s, 3)
    out["megapixels_per_s"] = round(summary.megapixels_per_s, 3)
    return out


def _http(url: str, folder: Path, out: Path, concurrency: int, limit: int | None = None) -> Json:
    jobs = plan([folder], out, ".png")[:limit]

    async def go() -> tuple[int, int, list[tuple[Path, str]]]:
        async with AsyncClient(
            url, timeout_s=300, retry=Retry(attempts=6), max_connections=concurrency
        ) as client:
            return await remove_all(jobs, client, Options(), concurrency, progress=False)

    started = time.perf_counter()
    done, _, failures = asyncio.run(go())
    seconds = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "images": done,
        "failed": len(failures),
        "seconds": round(seconds, 2),
        "images_per_s": round(done / seconds, 3),
    }


def run_section(tmp: Path, images: Mapping[str, bytes], count: int, quick: bool) -> Json:
    folder = tmp / "bulk-in"
    megapixels = make_images(folder, images, count)
    files = sorted(folder.rglob("*.jpg"))
    sample = {
        str(p.relative_to(folder)): p.read_bytes() for p in files[:: max(1, len(files) // 24)]
    }
    config = serve_config(free_port())
    settings, live = served_settings(config)
    results: Json = {"images": len(files), "megapixels": round(megapixels, 1)}

    print("bulk: the model limit and the in-process pipeline ...", flush=True)
    results["model_limit"] = model_limit(settings, sample, 0.0 if quick else 3.0)
    results["pipeline"] = in_process(settings, live, sample, 8 if quick else 64, 1)

    print(f"bulk: rembg-serve batch over {len(files)} images ...", flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    try:
        summary = run(
            str(folder), str(tmp / "bulk-out"), BulkConfig(settings=settings, progress=False)
        )
    finally:
        ray.shutdown()
    results["bulk"] = summary_json(summary)
    results["bulk"]["failures"] = summary.failures[:5]

    print("bulk: the HTTP path (serve run + rembg-serve remove) ...", flush=True)
    with running_service(tmp, config) as service:
        probes = {
            c: _http(service.url, folder, tmp / f"probe-{c}", c, limit=c if quick else 2 * c)
            for c in CONCURRENCY_PROBE
        }
        best = max(probes, key=lambda c: probes[c]["images_per_s"])
        results["http_probe"] = {str(c): p["images_per_s"] for c, p in probes.items()}
        results["http"] = _http(service.url, folder, tmp / "http-out", best)
    pairs = [
        (
            tmp / "bulk-out" / p.relative_to(folder).with_suffix(".png"),
            tmp / "http-out" / p.relative_to(folder).with_suffix(".png"),
        )
        for p in files[:: max(1, len(files) // 16)]
    ]
    results["parity_with_http"] = {
        "compared": len(pairs),
        "identical": all(
            a.is_file() and b.is_file() and compare(a.read_bytes(), b.read_bytes()).identical
            for a, b in pairs
        ),
    }
    return results


def targets(results: Json) -> list[tuple[str, float | bool | None, str, float | None]]:
    bulk = results["bulk"]["images_per_s"]
    growth = [peak / first for first, peak in results["bulk"]["actor_rss_mib"].values() if first]
    return [
        ("bulk / in-process pipeline", bulk / results["pipeline"]["images_per_s"], ">=", 0.9),
        ("bulk / HTTP path (best concurrency)", bulk / results["http"]["images_per_s"], ">=", 1.3),
        (
            "bulk under way / in-process pipeline",
            (results["bulk"]["steady_images_per_s"] / results["pipeline"]["images_per_s"])
            or None,  # a run too short to tell
            ">=",
            0.9,
        ),
        ("bulk / model limit", bulk / results["model_limit"]["images_per_s"], ">=", 0.8),
        ("bulk actor RSS peak / first batch", max(growth) if growth else None, "<=", 1.2),
        ("bulk failed images", float(results["bulk"]["failed"]), "<=", 0.0),
        (
            "bulk = HTTP output (pixel-identical)",
            results["parity_with_http"]["identical"],
            "==",
            None,
        ),
    ]


def table(results: Json) -> list[str]:
    bulk, http = results["bulk"], results["http"]
    rss = ", ".join(
        f"{first:.0f} -> {peak:.0f} MiB" for first, peak in bulk["actor_rss_mib"].values()
    )
    return [
        "",
        f"bulk: {results['images']} images, {results['megapixels']} MP",
        f"  model limit          {results['model_limit']['images_per_s']:>7} img/s",
        f"  in-process pipeline  {results['pipeline']['images_per_s']:>7} img/s (c16)",
        f"  bulk (Ray Data)      {bulk['images_per_s']:>7} img/s, {bulk['megapixels_per_s']} MP/s, "
        f"{bulk['seconds']:.0f} s with start (first results at {bulk['first_results_s']:.1f} s; "
        f"{bulk['steady_images_per_s']} img/s once under way), actor RSS {rss}",
        f"  HTTP path            {http['images_per_s']:>7} img/s at c{http['concurrency']} "
        f"(probe {results['http_probe']})",
    ]
