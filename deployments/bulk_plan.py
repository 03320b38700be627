"""Bulk mode's plan: the images under a folder, a glob or a URI, each mapped to
its output, the folders kept (as ``rembg-serve remove`` does, same-named files
apart), leaving out those already written: a rerun resumes.

Paths are local, or any URI pyarrow's filesystems open (``s3://``, ``gs://``,
``abfs://``, ``hdfs://``).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from deployments.files import PARTIAL_SUFFIX, is_image, output_names


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path on it (local paths made absolute)."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


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
            if p.is_file() and is_image(p.name)
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
        if f.type == pafs.FileType.File and is_image(f.path)
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
        if f.path.endswith(PARTIAL_SUFFIX):
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
