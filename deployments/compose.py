"""Compose stage: the model's small mask + the full-size image -> the cut-out.

The cut-out helpers are rembg's own (``rembg.bg``), called in the order that
``rembg.remove`` calls them, so that the default output matches rembg's. The
default cut-out needs none of them: rembg (and pymatting, whose numba code
compiles on first import) is imported only in the branches that use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image

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


def compose(img: Image.Image, mask: Image.Image, options: CutoutOptions) -> Image.Image:
    """Cut ``img`` (RGB or RGBA) out along ``mask`` (L, same size), as rembg.remove."""
    if options.post_process_mask:
        from rembg.bg import post_process

        mask = Image.fromarray(post_process(np.asarray(mask)))
    if options.only_mask:
        return mask
    cutout: Image.Image
    if options.alpha_matting:
        from rembg.bg import alpha_matting_cutout, decontaminate_cutout

        try:
            cutout = alpha_matting_cutout(
                img,
                mask,
                options.alpha_matting_foreground_threshold,
                options.alpha_matting_background_threshold,
                options.alpha_matting_erode_size,
            )
        except ValueError:
            # rembg's own fallback when the trimap leaves nothing to solve.
            cutout = decontaminate_cutout(img, mask)
    elif options.decontaminate:
        from rembg.bg import decontaminate_cutout

        cutout = decontaminate_cutout(img, mask)
    else:
        cutout = naive_cutout(img, mask)
    if options.bgcolor is not None:
        cutout = apply_background_color(cutout, options.bgcolor)
    return cutout


def apply_background_color(img: Image.Image, color: tuple[int, int, int, int]) -> Image.Image:
    """rembg's ``apply_background_color``, written out: the cut-out over a plain colour.

    Two Pillow calls; importing ``rembg.bg`` for them would compile pymatting.
    """
    return Image.alpha_composite(Image.new("RGBA", img.size, color), img)
