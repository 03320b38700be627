"""The stages chained: what the ingress runs around the model call.

``prepare`` (decode + resize) runs before the model, ``finish`` (mask upscale,
compose, encode) after it; ``remove`` chains them around an in-process model for
the benchmark and the tests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image

from deployments import fast
from deployments.compose import RefineLimits, compose, mask_to_size, naive_cutout_png
from deployments.decode import Limits, decode
from deployments.encode import encode
from deployments.models import ModelSpec
from deployments.options import CutoutOptions, Fidelity, OutputFormat
from deployments.preprocess import model_input

if TYPE_CHECKING:  # the ingress runs these stages without ONNX Runtime
    from deployments.infer import OnnxModel
    from deployments.settings import AppSettings


@dataclass(frozen=True)
class ImageSettings:
    """How each image is decoded and finished, by whichever runs the stages: an
    ingress replica (``service.Remover``) or a bulk actor (``bulk.Cutter``)."""

    limits: Limits
    png_compress_level: int
    refine: RefineLimits
    # What a request that names no fidelity gets.
    fidelity: Fidelity
    # Decoded pixels held at once, decode to encode.
    pixel_budget: int

    @classmethod
    def of(cls, settings: AppSettings, fidelity: Fidelity | None = None) -> ImageSettings:
        return cls(
            limits=settings.limits,
            png_compress_level=settings.png_compress_level,
            refine=settings.refine,
            fidelity=fidelity or settings.fidelity,
            pixel_budget=settings.pixel_budget,
        )


@dataclass(frozen=True)
class Prepared:
    image: Image.Image
    model_input: npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Finished:
    body: bytes
    width: int
    height: int


def sample_jpeg(limits: Limits) -> bytes:
    """A photo-sized JPEG with structure, to warm the whole request path with.

    Photo-sized, not tiny: the first multi-megabyte buffers also cost page faults
    (the allocator then keeps the memory), ~20 ms that a first user would pay.
    2048x1536, or smaller where ``limits`` would refuse that.
    """
    scale = min(1.0, (limits.max_pixels / (2048 * 1536)) ** 0.5, limits.max_side / 2048)
    width, height = max(1, int(2048 * scale)), max(1, int(1536 * scale))
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x ^ y) & 255], axis=-1)
    out = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def prepare(data: bytes, spec: ModelSpec, limits: Limits) -> Prepared:
    image = decode(data, limits)
    return Prepared(image=image, model_input=model_input(image, spec.size))


def finish(
    image: Image.Image,
    mask: npt.NDArray[np.uint8],
    options: CutoutOptions,
    fmt: OutputFormat = "png",
    png_compress_level: int = 1,
    refine: RefineLimits | None = None,
    fidelity: Fidelity = "exact",
) -> Finished:
    """The cut-out of ``image`` along its model-size ``mask``, encoded; ``fidelity``
    says how the mask is upscaled (``deployments.fast``)."""
    upscale = fast.mask_to_size if fidelity == "fast" else mask_to_size
    alpha = upscale(mask, image.size)
    if image.mode == "RGB" and fmt == "png" and png_compress_level == 1 and options.plain:
        # The default cut-out: compose + encode's bytes, in one striped pass.
        body = naive_cutout_png(image, alpha)
    else:
        cutout = compose(image, alpha, options, refine or RefineLimits())
        body = encode(cutout, fmt, png_compress_level)
    return Finished(body=body, width=image.width, height=image.height)


def remove(
    data: bytes,
    model: OnnxModel,
    options: CutoutOptions | None = None,
    fmt: OutputFormat = "png",
    limits: Limits | None = None,
    png_compress_level: int = 1,
    fidelity: Fidelity = "exact",
) -> Finished:
    """The whole pipeline in this process, one image."""
    prepared = prepare(data, model.spec, limits or Limits())
    mask = model.predict([prepared.model_input])[0]
    return finish(
        prepared.image,
        mask,
        options or CutoutOptions(),
        fmt,
        png_compress_level,
        fidelity=fidelity,
    )
