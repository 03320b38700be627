"""The fast cut-out against the exact one, image by image: the quality gate.

For each photo (rembg's test photos) as it is and remade as generated cases
(JPEG at 0.3, 1, 2 and 12 megapixels, landscape and portrait; PNG; RGBA with
transparent areas; 16-bit and 8-bit grayscale; an EXIF-rotated JPEG), both
fidelities run through the service's own stages with the real model, and the
rows give:

- the mean and the 99.9th percentile of |alpha_fast - alpha_exact| in grey levels;
- the IoU of the two masks alpha >= 128;
- whether every output pixel (colour and alpha) is rembg's compose formula of the
  input's pixel and that fidelity's own upscaled mask (``colour_kept``): fast
  changes the alpha, never the colour.

The gate (``GATE``) holds on every row. ``python -m deployments.bench fidelity``
prints the table; tests/test_fidelity.py asserts it on the test photos.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from deployments import fast
from deployments.bench.harness import Json
from deployments.compose import mask_to_size
from deployments.decode import Limits, decode
from deployments.infer import OnnxModel
from deployments.options import CutoutOptions, Fidelity
from deployments.pipeline import finish, prepare

# On every image: mean |delta alpha| <= 1 level, IoU of alpha >= 128 >= 0.995.
GATE_MEAN_LEVELS = 1.0
GATE_IOU = 0.995
MEGAPIXELS = (0.3, 1.0, 2.0, 12.0)
QUICK_MEGAPIXELS = (0.3,)
# EXIF Orientation 6: the stored pixels are to be turned 90 degrees clockwise.
ROTATE_CW = 6


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes


@dataclass(frozen=True)
class Row:
    name: str
    size: str
    mean_levels: float
    p999_levels: float
    iou: float
    colour_kept: bool

    @property
    def passed(self) -> bool:
        return self.mean_levels <= GATE_MEAN_LEVELS and self.iou >= GATE_IOU and self.colour_kept


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def _sized(photo: Image.Image, megapixels: float, portrait: bool) -> Image.Image:
    """``photo`` cropped to 4:3 (or 3:4) about its centre and resized to ``megapixels``."""
    ratio = 3 / 4 if portrait else 4 / 3
    width, height = photo.size
    if width / height > ratio:
        crop_w, crop_h = round(height * ratio), height
    else:
        crop_w, crop_h = width, round(width / ratio)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    out_w = round(math.sqrt(megapixels * 1e6 * ratio))
    box = (left, top, left + crop_w, top + crop_h)
    return photo.resize((out_w, round(out_w / ratio)), Image.Resampling.BICUBIC, box)


def cases(photos: dict[str, bytes], megapixels: tuple[float, ...] = MEGAPIXELS) -> Iterator[Case]:
    """Each photo as it is, then remade as every generated kind of input."""
    for name, data in photos.items():
        stem = name.rsplit(".", 1)[0]
        yield Case(name, data)
        with Image.open(io.BytesIO(data)) as opened:
            photo = opened.convert("RGB")
        for mp in megapixels:
            for portrait in (False, True):
                img = _sized(photo, mp, portrait)
                yield Case(
                    f"{stem} {mp:g}MP {'portrait' if portrait else 'landscape'} jpeg",
                    _save(img, "JPEG", quality=90),
                )
        small = megapixels[0]
        img = _sized(photo, small, False)
        yield Case(f"{stem} {small:g}MP png", _save(img, "PNG", compress_level=1))
        yield Case(f"{stem} {small:g}MP rgba png", _save(_with_holes(img), "PNG", compress_level=1))
        gray16 = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        yield Case(
            f"{stem} {small:g}MP 16-bit gray png",
            _save(Image.fromarray(gray16), "PNG", compress_level=1),
        )
        yield Case(f"{stem} {small:g}MP gray jpeg", _save(img.convert("L"), "JPEG", quality=90))
        exif = Image.Exif()
        exif[0x0112] = ROTATE_CW
        yield Case(
            f"{stem} {small:g}MP exif-rotated jpeg",
            _save(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif),
        )


def _with_holes(img: Image.Image) -> Image.Image:
    """``img`` as RGBA: a fully transparent band on the left, a ramp of alpha at the top."""
    width, height = img.size
    alpha = np.full((height, width), 255, dtype=np.uint8)
    alpha[:, : width // 5] = 0
    alpha[: height // 4, :] = np.linspace(0, 255, height // 4, dtype=np.uint8)[:, None]
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _blend(channel: npt.NDArray[np.uint8], mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Pillow's paste through an L mask onto transparent black (rembg's naive_cutout)."""
    tmp = channel.astype(np.uint32) * mask + 128
    return (((tmp >> 8) + tmp) >> 8).astype(np.uint8)


def cut(model: OnnxModel, data: bytes, fidelity: Fidelity) -> tuple[npt.NDArray[np.uint8], bool]:
    """The cut-out's RGBA pixels, and whether each is the compose formula of the
    input's pixel and this fidelity's upscaled mask."""
    limits = Limits()
    prepared = prepare(data, model.spec, limits)
    mask = model.predict([prepared.model_input])[0]
    body = finish(prepared.image, mask, CutoutOptions(), fidelity=fidelity).body
    with Image.open(io.BytesIO(body)) as png:
        out = np.asarray(png.convert("RGBA"))
    upscale = fast.mask_to_size if fidelity == "fast" else mask_to_size
    alpha = np.asarray(upscale(mask, prepared.image.size))[..., None]
    source = np.asarray(decode(data, limits).convert("RGBA"))
    return out, bool(np.array_equal(out, _blend(source, alpha)))


def compare(model: OnnxModel, case: Case) -> Row:
    exact, exact_kept = cut(model, case.data, "exact")
    quick, fast_kept = cut(model, case.data, "fast")
    a, b = exact[..., 3], quick[..., 3]
    delta = np.abs(a.astype(np.int16) - b.astype(np.int16))
    inside_a, inside_b = a >= 128, b >= 128
    union = int(np.count_nonzero(inside_a | inside_b))
    iou = 1.0 if union == 0 else int(np.count_nonzero(inside_a & inside_b)) / union
    return Row(
        name=case.name,
        size=f"{a.shape[1]}x{a.shape[0]}",
        mean_levels=round(float(delta.mean()), 3),
        p999_levels=float(np.percentile(delta, 99.9)),
        iou=round(iou, 5),
        colour_kept=exact_kept and fast_kept,
    )


def run_section(model: OnnxModel, photos: dict[str, bytes], quick: bool) -> Json:
    print("fidelity: fast against exact on every case ...", flush=True)
    rows = [compare(model, c) for c in cases(photos, QUICK_MEGAPIXELS if quick else MEGAPIXELS)]
    return {
        "gate": {"mean_levels_at_most": GATE_MEAN_LEVELS, "iou_at_least": GATE_IOU},
        "rows": [{**asdict(r), "passed": r.passed} for r in rows],
    }


def targets(results: Json) -> list[tuple[str, float | bool | None, str, float | None]]:
    rows = results["rows"]
    return [
        ("fidelity: fast within the gate, every case", all(r["passed"] for r in rows), "", None),
        (
            "fidelity: worst mean |d alpha| (levels)",
            max(r["mean_levels"] for r in rows),
            "<=",
            GATE_MEAN_LEVELS,
        ),
        ("fidelity: worst IoU alpha>=128", min(r["iou"] for r in rows), ">=", GATE_IOU),
    ]


def table(results: Json) -> list[str]:
    lines = [
        "",
        f"fidelity: fast against exact (gate: mean <= {GATE_MEAN_LEVELS} levels, "
        f"IoU >= {GATE_IOU}, colour kept)",
        f"{'case':44}{'size':>11}{'mean':>7}{'p99.9':>7}{'IoU':>9}  colour  gate",
    ]
    for r in results["rows"]:
        lines.append(
            f"{r['name']:44}{r['size']:>11}{r['mean_levels']:>7}{r['p999_levels']:>7g}"
            f"{r['iou']:>9}  {'kept' if r['colour_kept'] else 'CHANGED':6}  "
            f"{'PASS' if r['passed'] else 'FAIL'}"
        )
    return lines
