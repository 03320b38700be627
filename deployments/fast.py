"""The ``fast`` cut-out: cheaper resamplings around the model, rembg's compose formula.

``exact`` (the default) is rembg's pixels: LANCZOS to the model size, LANCZOS
back up, ``naive_cutout``. ``fast`` changes only how the alpha is made, never the
colour formula: the model's input is the image box-reduced (``Image.reduce``) by
whole factors to at least the model size, then LANCZOS over the few pixels left;
the mask is upscaled BILINEAR; and the default PNG cut-out of an RGB image is
composed and encoded in one pass over stripes of rows (``cutout_png``). The colour
of every pixel is rembg's function of the input's colour and the alpha, so where
the alpha is opaque the colour is the input's, exactly. How close the alpha
stays is measured on every photo (``python -m deployments.bench fidelity``,
tests/README.md); tests/test_fidelity.py holds the gate.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
from PIL import Image

from deployments.encode import png_from_stripes

# Rows composed, filtered and deflated per step: small enough that a stripe's
# RGB, alpha and RGBA rows stay in the CPU's cache between the steps.
STRIPE_BYTES = 1 << 20


def model_input(img: Image.Image, size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """``img`` at the model's ``size`` (width, height): uint8 (height, width, 3).

    A box reduction by the largest whole factor that keeps each side at least the
    model's, then LANCZOS for what is left (under 2x): about a quarter of the CPU
    of LANCZOS over every pixel (measured at 1 MP), the same filter at the end.
    """
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    factors = (max(1, rgb.width // size[0]), max(1, rgb.height // size[1]))
    if factors != (1, 1):
        rgb = rgb.reduce(factors)
    return np.asarray(rgb.resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)


def mask_to_size(mask: npt.NDArray[np.uint8], size: tuple[int, int]) -> Image.Image:
    """The model-size uint8 mask resized to ``size`` BILINEAR (2 taps a side, not 6)."""
    return Image.fromarray(mask, mode="L").resize(size, Image.Resampling.BILINEAR)


def cutout_png(img: Image.Image, alpha: Image.Image) -> bytes:
    """rembg's ``naive_cutout`` of the RGB ``img`` along ``alpha`` (L, same size), as
    ``encode.fast_png`` writes it, built stripe by stripe.

    rembg pastes the image into transparent black through the mask, so each colour
    becomes ``round(colour * alpha / 255)`` and the alpha the mask's; Pillow's
    RGBA -> RGBa conversion computes exactly that (the same rounding), so the PNG's
    pixels are ``naive_cutout``'s, byte for byte, without the full-size RGBA image,
    its blank canvas or the encoder's copies of it.
    """
    if img.mode != "RGB" or alpha.mode != "L" or alpha.size != img.size:
        raise ValueError(f"cutout_png takes an RGB image and an L mask of its size, got {img.mode}")
    step = max(1, STRIPE_BYTES // (img.width * 4))
    return png_from_stripes(img.size, "RGBA", _premultiplied(img, alpha, step))


def _premultiplied(
    img: Image.Image, alpha: Image.Image, step: int
) -> Iterator[npt.NDArray[np.uint8]]:
    width, height = img.size
    for top in range(0, height, step):
        box = (0, top, width, min(top + step, height))
        part = img.crop(box).convert("RGBA")
        part.putalpha(alpha.crop(box))
        yield np.asarray(part.convert("RGBa"))
