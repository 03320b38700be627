"""Which files a run reads and writes: the image suffixes, the output names, the
local plan of ``rembg-serve remove``, the check that an output is whole, and the
one atomic write every output goes through (``rembg-serve remove``'s and bulk
mode's, on any pyarrow filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs as pafs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# An output is written as ``.<name>.<8 hex>.rembg-serve.part`` beside it, then
# renamed: a file so named is one a killed run left behind, never a finished
# output. Only such names are ever cleaned up: a user's ``notes.part`` is not ours.
PARTIAL_SUFFIX = ".rembg-serve.part"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX) + "$")


class PlanRefused(ValueError):
    """A run that would lose or overwrite files: refused before any work."""


def is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def partial_name(name: str) -> str:
    """A fresh temporary name for the output ``name`` (a file name, no folder)."""
    return f".{name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def partial_of(name: str) -> str | None:
    """The output a temporary ``name`` was written for; None if it is not one of ours."""
    found = _PARTIAL.match(name)
    return found["name"] if found else None


def is_safe_relative(rel: PurePath) -> bool:
    """True if ``rel`` joined to any folder stays inside it: relative, and no
    ``..`` or empty part (an object key may hold either, a local path cannot)."""
    parts = rel.as_posix().split("/")
    return not rel.is_absolute() and all(part not in ("", ".", "..") for part in parts)


def _name_at(rel: PurePath, level: int, suffix: str) -> PurePath:
    if level == 0:
        return rel.parent / (rel.stem + suffix)
    if level == 1:
        return rel.parent / (rel.name + suffix)
    digest = hashlib.sha1(rel.as_posix().encode()).hexdigest()[:8]
    return rel.parent / f"{rel.name}.{digest}{suffix}"


def _folders(name: PurePath) -> Iterable[str]:
    return (parent.as_posix().casefold() for parent in name.parents if parent.parts)


def output_names(rels: Sequence[PurePath], suffix: str) -> list[PurePath]:
    """Each input's relative path -> its output's, the folders kept, no two alike.

    The mapping depends only on the inputs, so a rerun finds the same outputs
    (that is what makes a run resumable). An output is ``a.png`` for ``a.jpg``
    unless that name clashes with another output in the whole set (``a.png``
    beside it, say), compared without case (a case-insensitive disk would write
    them to one file) and against the folders the outputs go in; every output of
    a clash then keeps its full name (``a.jpg.png``, ``a.png.png``), and outputs
    that still clash (``A.jpg``, ``a.jpg``) get a short hash of their path too.
    Raises ``ValueError`` for the same path given twice.
    """
    repeated = [rel for rel, n in Counter(rels).items() if n > 1]
    if repeated:
        raise ValueError(f"the same input path twice: {repeated[0]}")
    levels = [0] * len(rels)
    while True:
        names = [_name_at(rel, level, suffix) for rel, level in zip(rels, levels, strict=True)]
        keys = [name.as_posix().casefold() for name in names]
        counts = Counter(keys)
        folders = {folder for name in names for folder in _folders(name)}
        clashing = [i for i, key in enumerate(keys) if counts[key] > 1 or key in folders]
        if not clashing:
            return names
        # In each clash only the outputs at its lowest level move on: a.jpg.webp
        # (a.jpg.png) becomes a.jpg.webp.png, and a.jpg keeps a.jpg.png.
        lowest: dict[str, int] = {}
        for i in clashing:
            lowest[keys[i]] = min(lowest.get(keys[i], 2), levels[i])
        for i in clashing:
            if levels[i] == lowest[keys[i]]:
                if levels[i] == 2:
                    raise ValueError(f"cannot name the output of {rels[i]} apart from another")
                levels[i] += 1


def output_is_whole(path: Path) -> bool:
    """True if ``path`` is a finished output: readable, not empty, and for PNG and
    WebP (what the service writes) framed from its signature to its last byte. A
    cheap check (its first and last bytes, no decode) so a rerun may call it on
    every output: an empty or torn file left by a crash is redone."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(16)
            file.seek(max(0, size - 12))
            tail = file.read(12)
    except OSError:
        return False
    if size == 0:
        return False
    suffix = path.suffix.lower()
    if suffix == ".png":
        return head.startswith(b"\x89PNG\r\n\x1a\n") and tail == b"\0\0\0\0IEND\xaeB`\x82"
    if suffix == ".webp":
        return (
            head[:4] == b"RIFF"
            and head[8:12] == b"WEBP"
            and struct.unpack("<I", head[4:8])[0] + 8 == size
        )
    return True


@dataclass(frozen=True)
class FileJob:
    """One local input file and the output it becomes."""

    source: Path
    target: Path


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def plan(inputs: Sequence[Path], outdir: Path, suffix: str) -> list[FileJob]:
    """Each input file -> its output path; folders are walked, their layout kept
    (see ``output_names``).

    An output folder inside an input folder is left out of its walk (earlier
    outputs are not inputs). Raises ``PlanRefused`` before any work where outputs
    would collide or land on inputs: two inputs with the same relative path (from
    two folders given), an output on an input file, or one inside an input
    folder that holds the output folder (``remove shots/raw -o shots`` is fine
    unless ``shots/raw/raw/...`` exists).
    """
    out = outdir.resolve()
    pairs: list[tuple[Path, Path]] = []
    walked: list[Path] = []
    seen: dict[Path, None] = {}
    for item in inputs:
        if item.is_dir():
            root = item.resolve()
            skip_out = out != root and out.is_relative_to(root)
            if not skip_out:
                walked.append(root)
            for path in sorted(item.rglob("*")):
                rel = path.relative_to(item)
                if skip_out and _inside(root / rel, out):
                    continue
                if path.is_file() and is_image(path.name):
                    pairs.append((path, rel))
        elif item.is_file():
            pairs.append((item, Path(item.name)))
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    # One file given twice (a folder and a file in it): sent once.
    unique: list[tuple[Path, Path]] = []
    for source, rel in pairs:
        if source.resolve() not in seen:
            seen[source.resolve()] = None
            unique.append((source, rel))
    by_rel: dict[Path, Path] = {}
    for source, rel in unique:
        if rel in by_rel:
            raise PlanRefused(
                f"{by_rel[rel]} and {source} have the same path in their folders ({rel}): "
                f"their outputs would be one file in {outdir}. Give them separate runs (-o) "
                "or their common folder as INPUT"
            )
        by_rel[rel] = source
    names = output_names([rel for _, rel in unique], suffix)
    jobs = [FileJob(source, outdir / name) for (source, _), name in zip(unique, names, strict=True)]
    for job in jobs:
        target = out / job.target.relative_to(outdir)
        if target in seen or any(_inside(target, root) for root in walked):
            raise PlanRefused(
                f"the output {job.target} would be written inside an input (the output folder "
                f"{outdir} holds it): choose an output folder outside the inputs"
            )
    return jobs


def remove_leftovers(targets: Iterable[Path]) -> int:
    """Delete the temporaries a killed run left for these outputs (local); how many."""
    wanted: dict[Path, set[str]] = {}
    for target in targets:
        wanted.setdefault(target.parent, set()).add(target.name)
    removed = 0
    for folder, names in wanted.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if partial_of(entry.name) in names:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def _fsync_folder(folder: Path) -> None:
    """The rename into ``folder`` on disk too (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: str | Path, data: bytes, fs: pafs.FileSystem | None = None) -> None:
    """``data`` at ``target``, never half of it: written under a temporary name
    in the same folder (``partial_name``), then renamed, so that an interrupted
    run never leaves a truncated output that a resumed run would take as done.

    ``fs`` None or local: ``target`` is a local path; the bytes reach the disk
    (fsync) before the rename, and the rename before this returns (the folder's
    fsync). Another pyarrow filesystem (``s3://``, ...): its own streams and
    move, which flush on close. A failed write leaves no temporary behind.
    """
    if fs is None or fs.type_name == "local":
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(partial_name(path.name))
        try:
            with open(partial, "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)
        return
    posix = PurePosixPath(target)
    fs.create_dir(str(posix.parent), recursive=True)
    remote = str(posix.with_name(partial_name(posix.name)))
    try:
        with fs.open_output_stream(remote) as stream:
            stream.write(data)
        fs.move(remote, str(target))
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(remote)
        raise
