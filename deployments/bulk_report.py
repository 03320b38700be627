"""What a bulk run did: its ``Summary``, the report a person reads at its end, and
the failures report written beside the outputs (``_failures.jsonl``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt
import pyarrow.fs as pafs

from deployments.bulk_plan import filesystem

FAILURES_NAME = "_failures.jsonl"


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
    # The most pixels one actor call had decoded at once (what the pixel budget
    # bounds: a batch larger than it is decoded a part at a time).
    peak_decoded_pixels: int = 0

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
            self.peak_decoded_pixels = max(self.peak_decoded_pixels, int(rows["decoded"][i]))
            actor, rss = str(rows["actor"][i]), float(rows["rss_mib"][i])
            first, peak = self.actor_rss_mib.get(actor, (rss, rss))
            self.actor_rss_mib[actor] = (first, max(peak, rss))


def write_failures(output_uri: str, failures: list[tuple[str, int, str]]) -> None:
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
    if summary.peak_decoded_pixels:
        mp = summary.peak_decoded_pixels / 1e6
        lines.append(f"  at most {mp:.1f} MP decoded at once by a call")
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
