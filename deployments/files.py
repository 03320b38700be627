"""Which files a run reads and writes: the image suffixes, the output names, the
local plan of ``rembg-serve remove``, and the one atomic write every output goes
through (``rembg-serve remove``'s and bulk mode's, on any pyarrow filesystem).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# An output is written under its name plus this, then renamed: a file with it is
# one a killed run left behind, never a finished output.
PARTIAL_SUFFIX = ".part"


def is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def output_names(rels: Sequence[PurePath], suffix: str) -> list[PurePath]:
    """Each input's relative path -> its output's, the folders kept.

    The mapping depends only on the inputs, so a rerun finds the same outputs
    (that is what makes a run resumable). ``a.jpg`` and ``a.png`` in one folder
    would both become ``a.png``: those keep their full name (``a.jpg.png``).
    """
    stems = Counter(rel.with_suffix("") for rel in rels)
    return [
        rel.parent / ((rel.name if stems[rel.with_suffix("")] > 1 else rel.stem) + suffix)
        for rel in rels
    ]


@dataclass(frozen=True)
class FileJob:
    """One local input file and the output it becomes."""

    source: Path
    target: Path


def plan(inputs: Sequence[Path], outdir: Path, suffix: str) -> list[FileJob]:
    """Each input file -> its output path; folders are walked, their layout kept
    (see ``output_names``)."""
    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and is_image(p.name))
            pairs.extend((p, p.relative_to(item)) for p in files)
        elif item.is_file():
            pairs.append((item, Path(item.name)))
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    names = output_names([rel for _, rel in pairs], suffix)
    return [FileJob(source, outdir / name) for (source, _), name in zip(pairs, names, strict=True)]


def write_atomic(target: str | Path, data: bytes, fs: pafs.FileSystem | None = None) -> None:
    """``data`` at ``target``, never half of it: written under a temporary name
    in the same folder, then renamed, so that an interrupted run never leaves a
    truncated output that a resumed run would take as done.

    ``fs`` None or local: ``target`` is a local path, and the bytes reach the disk
    (fsync) before the rename. Another pyarrow filesystem (``s3://``, ...): its
    own streams and move, which flush on close.
    """
    partial = f"{target}{PARTIAL_SUFFIX}"
    if fs is None or fs.type_name == "local":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
        return
    fs.create_dir(str(PurePosixPath(target).parent), recursive=True)
    with fs.open_output_stream(partial) as stream:
        stream.write(data)
    fs.move(partial, str(target))
