"""Bulk mode's plan: the images under a folder, a glob or a URI, each mapped to
its output, the folders kept (as ``rembg-serve remove`` does, same-named files
apart), leaving out those already written: a rerun resumes.

Paths are local, or any URI pyarrow's filesystems open (``s3://``, ``gs://``,
``abfs://``, ``hdfs://``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from deployments.files import (
    PlanRefused,
    is_image,
    is_safe_relative,
    output_is_whole,
    output_names,
    partial_of,
)

# The status of an input the plan leaves out (a name that would leave OUTPUT, a
# glob match outside its folder): a line of the failures report, as a 400.
_REFUSED = 400


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path on it (local paths made absolute)."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ""


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def input_root(uri: str) -> str:
    """The folder whose layout a run keeps: ``uri``'s, a glob's fixed part, a file's own."""
    if "://" not in uri and glob.has_magic(uri):
        parts = Path(uri).expanduser().parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        return str(Path(*parts[:fixed]).resolve() if fixed else Path.cwd().resolve())
    return filesystem(uri)[1]


def list_inputs(uri: str) -> list[tuple[str, PurePosixPath]]:
    """Every image under ``uri`` (a folder, a file or a local glob) with its
    path relative to the folder (for a glob: to the folder before its first
    wildcard), sorted.

    A glob's symlinks are followed and named as the glob found them; a match that
    is not under the glob's folder (``shots/*/../../x.jpg``) keeps its path as
    its relative one, which ``plan`` then refuses (it has ``..``).
    """
    if "://" not in uri and glob.has_magic(uri):
        parts = Path(uri).expanduser().parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        base = os.path.abspath(Path(*parts[:fixed]) if fixed else Path.cwd())
        root = input_root(uri)
        found = []
        for match in glob.glob(str(Path(*parts)), recursive=True):
            # abspath, not resolve: a symlink keeps the name it has under base.
            if os.path.isfile(match) and is_image(match):
                rel = PurePosixPath(os.path.relpath(os.path.abspath(match), base))
                found.append((os.path.normpath(f"{root}/{rel}"), rel))
        return sorted(found)
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [(root, PurePosixPath(PurePosixPath(root).name))]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such file or folder: {uri}")
    selected = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(
        (f.path, PurePosixPath(f.path).relative_to(root))
        for f in selected
        if f.type == pafs.FileType.File and is_image(f.path)
    )


@dataclass(frozen=True)
class Plan:
    """What a run does: (source, target) pairs still to do, how many are done,
    and the inputs left out as (source, status, message): failure lines."""

    todo: list[tuple[str, str]]
    skipped: int
    output_root: str
    refused: list[tuple[str, int, str]] = field(default_factory=list)


def budget_groups(pixels: Sequence[int], capacity: int) -> list[list[int]]:
    """The indices of ``pixels`` in runs of consecutive images whose pixels fit
    ``capacity`` together (one larger than it alone): a batch is decoded one
    group at a time, each within the budget it holds."""
    groups: list[list[int]] = []
    held = capacity + 1
    for i, amount in enumerate(pixels):
        if held + amount > capacity:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += amount
    return groups


def map_outputs(
    inputs: Sequence[tuple[str, PurePosixPath]], out_root: str, suffix: str
) -> tuple[list[tuple[str, str]], list[tuple[str, int, str]]]:
    """(source, relative path) -> (source, target under ``out_root``), and the
    inputs refused: a relative path with ``..`` or an empty part (an object key
    may have them) would put its output outside ``out_root``."""
    kept = [(src, rel) for src, rel in inputs if is_safe_relative(rel)]
    refused = [
        (src, _REFUSED, f"its path under INPUT ({rel}) would leave OUTPUT: not written")
        for src, rel in inputs
        if not is_safe_relative(rel)
    ]
    names = output_names([rel for _, rel in kept], suffix)
    pairs = [
        (src, f"{out_root}/{name.as_posix()}") for (src, _), name in zip(kept, names, strict=True)
    ]
    return pairs, refused


def plan(input_uri: str, output_uri: str, suffix: str) -> Plan:
    """Inputs -> outputs under ``output_uri``, without those already written.

    OUTPUT inside INPUT: OUTPUT's files are left out of the inputs. INPUT inside
    OUTPUT (``batch shots/raw shots``): the outputs go beside INPUT; a run that
    would write one inside INPUT (an input under ``shots/raw/raw/``, or INPUT and
    OUTPUT the same folder) raises ``PlanRefused`` before any work, as it would
    overwrite inputs or read its outputs as inputs next time. Only this run's
    kind of temporaries, for the outputs it plans, are deleted (left by a killed
    run); an output counts as done only if it is whole (``output_is_whole`` on
    a local disk, not empty elsewhere).
    """
    fs, out_root = filesystem(output_uri)
    in_root = input_root(input_uri)
    same_fs = _scheme(input_uri) == _scheme(output_uri)
    output_in_input = same_fs and out_root != in_root and _inside(out_root, in_root)
    inputs = [
        (src, rel)
        for src, rel in list_inputs(input_uri)
        # OUTPUT inside INPUT: the cut-outs are not inputs of the next run.
        if not (output_in_input and _inside(src, out_root))
    ]
    pairs, refused = map_outputs(inputs, out_root, suffix)
    if same_fs and not output_in_input:
        landing = next((t for _, t in pairs if _inside(t, in_root)), None)
        if landing is not None:
            raise PlanRefused(
                f"the output {landing} would be written inside INPUT {in_root} (OUTPUT "
                f"{out_root} holds it), over an input or read as one by the next run: "
                "choose an OUTPUT outside INPUT"
            )
    targets = {target for _, target in pairs}
    local = fs.type_name == "local"
    present = set()
    for f in fs.get_file_info(pafs.FileSelector(out_root, recursive=True, allow_not_found=True)):
        if f.type != pafs.FileType.File:
            continue
        leftover = partial_of(PurePosixPath(f.path).name)
        if leftover is not None:
            # A temporary a killed run left for one of our outputs: its image is
            # redone. Anything else (a user's notes.part) is not ours to delete.
            if f"{PurePosixPath(f.path).parent}/{leftover}" in targets:
                fs.delete_file(f.path)
        elif f.path in targets and (output_is_whole(Path(f.path)) if local else bool(f.size)):
            present.add(f.path)
    todo = [(src, target) for src, target in pairs if target not in present]
    return Plan(todo=todo, skipped=len(pairs) - len(todo), output_root=out_root, refused=refused)
