"""Per-model constants as one table, and where each model's file comes from.

A model file is found, in order: an explicit path from the config; the copy
embedded in this package (u2netp only); rembg's model store (``$REMBG_HOME``,
``$U2NET_HOME`` or ``~/.rembg``), through rembg's own session classes. Nothing
is downloaded here at serve time: ``rembg-serve fetch`` does that ahead of time.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deployments.errors import ModelUnavailable

ASSETS = Path(__file__).parent / "assets"

Activation = Literal["none", "sigmoid"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What rembg's session class for this model does, as data.

    ``size`` is the model input (width, height); ``mean``/``std`` are applied after
    rembg's per-image max scaling; ``output`` is the index of the output holding
    the mask; ``activation`` is applied to it before rembg's min-max scaling.
    """

    name: str
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: int = 0
    activation: Activation = "none"
    md5: str | None = None


def _u2net(name: str, md5: str) -> ModelSpec:
    return ModelSpec(name, (320, 320), IMAGENET_MEAN, IMAGENET_STD, md5=md5)


def _birefnet(name: str, md5: str | None) -> ModelSpec:
    return ModelSpec(name, (1024, 1024), IMAGENET_MEAN, IMAGENET_STD, activation="sigmoid", md5=md5)


# Constants copied from rembg 2.0.86's session classes (rembg/sessions/*.py).
MODEL_TABLE: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _u2net("u2netp", "8e83ca70e441ab06c318d82300c84806"),
        _u2net("u2net", "60024c5c889badc19c04ad937298a77b"),
        _u2net("u2net_human_seg", "c09ddc2e0104f800e3e1bb4652583d1f"),
        _u2net("silueta", "55e59e0d8062d2f5d013f4725ee84782"),
        ModelSpec(
            "isnet-general-use",
            (1024, 1024),
            (0.5, 0.5, 0.5),
            (1.0, 1.0, 1.0),
            md5="fc16ebd8b0c10d971d3513d564d01e29",
        ),
        ModelSpec(
            "isnet-anime",
            (1024, 1024),
            IMAGENET_MEAN,
            (1.0, 1.0, 1.0),
            md5="6f184e756bb3bd901c8849220a83e38e",
        ),
        ModelSpec("bria-rmbg", (1024, 1024), IMAGENET_MEAN, IMAGENET_STD),
        _birefnet("birefnet-general", "7a35a0141cbbc80de11d9c9a28f52697"),
        _birefnet("birefnet-general-lite", "4fab47adc4ff364be1713e97b7e66334"),
        _birefnet("birefnet-portrait", "c3a64a6abf20250d090cd055f12a3b67"),
        _birefnet("birefnet-dis", "2d4d44102b446f33a4ebb2e56c051f2b"),
        _birefnet("birefnet-hrsod", "c017ade5de8a50ff0fd74d790d268dda"),
        _birefnet("birefnet-cod", "f6d0d21ca89d287f17e7afe9f5fd3b45"),
        _birefnet("birefnet-massive", "33e726a2136a3d59eb0fdf613e31e3e9"),
    )
}

EMBEDDED: dict[str, Path] = {"u2netp": ASSETS / "u2netp.onnx"}


def spec_for(name: str) -> ModelSpec:
    try:
        return MODEL_TABLE[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_TABLE))
        raise ModelUnavailable(f"model {name!r} is not supported; supported: {known}") from None


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def store_candidates(name: str) -> list[Path]:
    """Where rembg's own store keeps ``name``'s file: its folder, then the legacy one.

    rembg 2.0.86's layout (``BaseSession.model_dir`` and ``legacy_home``), written
    out: importing rembg would import ``rembg.bg`` and compile pymatting's numba
    code, tens of seconds on a fresh machine, on the way to every replica's ready.
    tests/unit/test_stages.py checks it against rembg's own classes.
    """
    env = os.environ.get
    xdg = env("XDG_DATA_HOME")
    legacy = Path(env("U2NET_HOME") or os.path.join(xdg or "~", ".u2net")).expanduser()
    if env("U2NET_HOME"):
        home = legacy
    else:
        default = os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")
        home = Path(env("REMBG_HOME") or default).expanduser()
    fname = f"{name}.onnx"
    return [home / "models" / name / fname, legacy / fname]


def resolve_model_file(name: str, path: Path | None = None) -> Path:
    """The model's file on disk, checked against its md5 when the table has one.

    Raises ``ModelUnavailable`` naming the model and every path tried.
    """
    spec = spec_for(name)
    if path is not None:
        candidates = [path.expanduser()]
    else:
        candidates = ([EMBEDDED[name]] if name in EMBEDDED else []) + store_candidates(name)
    for candidate in candidates:
        if candidate.is_file():
            # An explicit path may be a re-export (fp16, a fine-tune): only the
            # files that rembg itself would use are held to rembg's checksum.
            if path is None and spec.md5 is not None:
                actual = md5_of(candidate)
                if actual != spec.md5:
                    raise ModelUnavailable(
                        f"model {name!r}: {candidate} has md5 {actual}, expected "
                        f"{spec.md5}; the file is corrupt or not this model"
                    )
            return candidate
    tried = ", ".join(str(c) for c in candidates) or "(no path)"
    raise ModelUnavailable(
        f"model {name!r} not found; tried: {tried}. "
        f"Run `rembg-serve fetch {name}` first, or set its path in the config."
    )


def fetch_model(name: str) -> Path:
    """Download ``name`` into rembg's store with rembg's own code (pooch + md5)."""
    spec_for(name)
    if name in EMBEDDED:
        return EMBEDDED[name]
    from rembg.sessions import sessions

    return Path(str(sessions[name].download_models()))
