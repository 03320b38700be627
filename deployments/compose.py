"""Compose stage: the model's small mask + the full-size image -> the cut-out.

The cut-out helpers are rembg's own (``rembg.bg``), called in the order that
``rembg.remove`` calls them, so that the default output matches rembg's. The
default cut-out needs none of them: rembg (and pymatting, whose numba code
compiles on first import) is imported only in the branches that use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from deployments.encode import png_from_stripes

if TYPE_CHECKING:
    from deployments.options import CutoutOptions


def mask_to_size(mask: npt.NDArray[np.uint8], size: tuple[int, int]) -> Image.Image:
    """The model-size uint8 mask resized to the image's ``size`` with LANCZOS."""
    return Image.fromarray(mask, mode="L").resize(size, Image.Resampling.LANCZOS)


def naive_cutout(img: Image.Image, mask: Image.Image) -> Image.Image:
    """rembg's ``naive_cutout`` without its extra full-size copy.

    rembg calls ``Image.composite(img, empty, mask)``, which copies ``empty``
    and pastes into the copy; pasting into ``empty`` itself gives the same pixels
    with one RGBA buffer less (96 MB at 24 megapixels).
    """
    cutout = Image.new("RGBA", img.size, 0)
    cutout.paste(img, None, mask)
    return cutout


# Rows composed and encoded per step of ``naive_cutout_png``: small enough that a
# stripe's RGB, alpha and RGBA rows stay in the CPU's cache from step to step.
STRIPE_BYTES = 1 << 20


def naive_cutout_png(img: Image.Image, mask: Image.Image) -> bytes:
    """``encode.fast_png(naive_cutout(img, mask))`` for an RGB ``img``, the same
    bytes, made stripe by stripe.

    Pasting through the mask onto transparent black turns each colour into
    ``round(colour * mask / 255)`` and the alpha into the mask; Pillow's RGBA ->
    RGBa conversion computes exactly that, with the same rounding. A stripe at a
    time, the full-size RGBA image, its blank canvas and the encoder's copies of
    it never exist.
    """
    if img.mode != "RGB" or mask.mode != "L" or mask.size != img.size:
        raise ValueError(f"an RGB image and an L mask of its size, not {img.mode}/{mask.mode}")
    step = max(1, STRIPE_BYTES // (img.width * 4))
    return png_from_stripes(img.size, "RGBA", _premultiplied(img, mask, step))


def _premultiplied(
    img: Image.Image, mask: Image.Image, step: int
) -> Iterator[npt.NDArray[np.uint8]]:
    width, height = img.size
    for top in range(0, height, step):
        box = (0, top, width, min(top + step, height))
        rgba = img.crop(box).convert("RGBA")
        rgba.putalpha(mask.crop(box))
        yield np.asarray(rgba.convert("RGBa"))


@dataclass(frozen=True)
class RefineLimits:
    """Pixels alpha matting and decontamination work on at most (see ``refined``).

    Measured on a 2-core machine: matting 1 MP took 10.5 s and +0.66 GB of RSS;
    decontaminating 4 MP took 1.1 s and +0.42 GB.
    """

    # Unknown keys in serve_config.yaml's `refine:` fail at start (pydantic reads
    # this; a plain dict keeps this module free of pydantic).
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    matting_max_pixels: int = 1_000_000
    decontaminate_max_pixels: int = 4_000_000

    def __post_init__(self) -> None:
        if self.matting_max_pixels <= 0 or self.decontaminate_max_pixels <= 0:
            raise ValueError("refine limits must be positive")


def compose(
    img: Image.Image,
    mask: Image.Image,
    options: CutoutOptions,
    refine: RefineLimits = RefineLimits(),
) -> Image.Image:
    """Cut ``img`` (RGB or RGBA) out along ``mask`` (L, same size), as rembg.remove.

    Alpha matting and decontamination run on at most ``refine``'s pixels (see
    ``refined``); everything else at full size.
    """
    if options.post_process_mask:
        mask = Image.fromarray(post_process_mask(np.asarray(mask)))
    if options.only_mask:
        return mask
    cutout: Image.Image
    if options.alpha_matting:
        cutout = refined(img, mask, partial(_matting, options), refine.matting_max_pixels)
    elif options.decontaminate:
        cutout = refined(img, mask, _decontaminate, refine.decontaminate_max_pixels)
    else:
        cutout = naive_cutout(img, mask)
    if options.bgcolor is not None:
        cutout = apply_background_color(cutout, options.bgcolor)
    return cutout


# Rows a band of post_process_mask reads beyond the rows it writes, on each side:
# rembg's opening with disk(1) (an erosion then a dilation, one row each) and its
# gaussian_filter (sigma 2, scipy's truncate 4.0: a radius of int(4 * 2 + 0.5) = 8).
_POST_PROCESS_HALO = 2 + 8


def post_process_mask(
    mask: npt.NDArray[np.uint8], band_pixels: int = 1_000_000
) -> npt.NDArray[np.uint8]:
    """rembg's ``post_process`` (opening, gaussian blur, threshold at 127) on a uint8
    (H, W) mask, the same bytes, computed in bands of rows of ~``band_pixels``.

    rembg blurs the whole mask in float64 with int64 and float64 temporaries,
    ~26 bytes a pixel (1.3 GB at 50 MP). Each output row depends only on the rows
    within ``_POST_PROCESS_HALO`` of it, and scipy computes each pixel with the same
    arithmetic wherever the band starts, so a band read with that halo gives exactly
    rembg's rows: full-size memory is the input and the output, 2 bytes a pixel, plus
    one band's temporaries (~26 MB).
    """
    from rembg.bg import post_process

    height, width = mask.shape
    step = max(1, band_pixels // max(1, width))
    if height <= step:
        out: npt.NDArray[np.uint8] = post_process(mask)
        return out
    out = np.empty_like(mask)
    for top in range(0, height, step):
        bottom = min(height, top + step)
        lo, hi = max(0, top - _POST_PROCESS_HALO), min(height, bottom + _POST_PROCESS_HALO)
        out[top:bottom] = post_process(mask[lo:hi])[top - lo : bottom - lo]
    return out


Refinement = Callable[[Image.Image, Image.Image], Image.Image]


def _matting(options: CutoutOptions, img: Image.Image, mask: Image.Image) -> Image.Image:
    from rembg.bg import alpha_matting_cutout

    try:
        cutout: Image.Image = alpha_matting_cutout(
            img,
            mask,
            options.alpha_matting_foreground_threshold,
            options.alpha_matting_background_threshold,
            options.alpha_matting_erode_size,
        )
        return cutout
    except ValueError:
        # rembg's own fallback when the trimap leaves nothing to solve.
        return _decontaminate(img, mask)


def _decontaminate(img: Image.Image, mask: Image.Image) -> Image.Image:
    from rembg.bg import decontaminate_cutout

    cutout: Image.Image = decontaminate_cutout(img, mask)
    return cutout


def refined(
    img: Image.Image, mask: Image.Image, refine: Refinement, max_pixels: int
) -> Image.Image:
    """``refine`` (rembg's matting or decontamination) at most at ``max_pixels``.

    Both work in float64 on every pixel (matting ~0.7 GB a megapixel, seconds to
    minutes), so a larger image is refined on a copy downscaled to fit (LANCZOS)
    and the result brought back: its alpha upscaled, its estimated foreground
    colours upscaled where the alpha is not opaque, and the photo's own pixels
    where it is. Within ``max_pixels`` this is rembg's result exactly.
    """
    width, height = img.size
    if width * height <= max_pixels:
        return refine(img, mask)
    scale = (max_pixels / (width * height)) ** 0.5
    small = (max(1, int(width * scale)), max(1, int(height * scale)))
    lanczos = Image.Resampling.LANCZOS
    cut = refine(img.resize(small, lanczos), mask.resize(small, lanczos))
    alpha = cut.getchannel("A").resize(img.size, lanczos)
    colours = cut.convert("RGB").resize(img.size, lanczos)
    opaque = alpha.point([0] * 255 + [255])
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    out = Image.composite(rgb, colours, opaque).convert("RGBA")
    out.putalpha(alpha)
    return out


def apply_background_color(img: Image.Image, color: tuple[int, int, int, int]) -> Image.Image:
    """rembg's ``apply_background_color``, written out: the cut-out over a plain colour.

    Two Pillow calls; importing ``rembg.bg`` for them would compile pymatting.
    """
    return Image.alpha_composite(Image.new("RGBA", img.size, color), img)


def warm_refine() -> None:
    """Import rembg's refiners and run each once on a small image.

    Importing ``rembg.bg`` compiles pymatting's numba code the first time a
    fresh environment imports it (about a minute on 2 cores; numba caches it
    beside the package) and the first calls compile the rest, so the service
    runs this after it is ready instead of inside the first matting request.
    """
    from rembg.bg import alpha_matting_cutout, decontaminate_cutout, post_process

    size = 64
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).astype(np.uint8)
    mask = Image.fromarray(disc * 255, mode="L")
    img = Image.fromarray(np.dstack([xx * 4, yy * 4, disc * 200]).astype(np.uint8), mode="RGB")
    post_process(np.asarray(mask))
    alpha_matting_cutout(img, mask, 240, 10, 3)
    decontaminate_cutout(img, mask)
