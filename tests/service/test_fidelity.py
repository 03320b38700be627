"""The fast cut-out: within its quality gate against exact, never a colour changed;
the one-pass cut-out writer gives the two-pass pixels; the setting's plumbing."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from PIL import Image

from conftest import ROOT, SHARED_IMAGES, gradient, image_bytes
from deployments import compose as compose_module
from deployments.bench.fidelity import QUICK_MEGAPIXELS, cases, compare
from deployments.compose import naive_cutout, naive_cutout_png
from deployments.encode import encode
from deployments.infer import OnnxModel
from deployments.options import (
    CutoutOptions,
    Fidelity,
    OptionsError,
    OutputFormat,
    RembgForm,
    RemoveQuery,
    parse,
)
from deployments.pipeline import finish
from deployments.service import Job, Remover, RemoverConfig
from deployments.settings import AppSettings

# The photo whose generated cases (each kind of input at 0.3 MP) the test runs too:
# the leafy one, where u2netp's mask is the most sensitive (the benchmark's
# `fidelity` section runs them for every photo, at 0.3 to 12 MP).
GENERATED_FROM = ("plants-1.jpg",)


@pytest.mark.parametrize("path", SHARED_IMAGES, ids=lambda p: p.name)
def test_fast_is_within_the_gate_and_keeps_every_colour(path: Path, u2netp: OnnxModel) -> None:
    photos = {path.name: path.read_bytes()}
    every = list(cases(photos, QUICK_MEGAPIXELS))
    chosen = every if path.name in GENERATED_FROM else every[:1]
    rows = [compare(u2netp, case) for case in chosen]
    failed = [r for r in rows if not r.passed]
    assert not failed, failed
    # Fast does change the alpha (else this test would prove nothing).
    assert any(r.mean_levels > 0 for r in rows)


def _decoded(png: bytes) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(png)) as img:
        assert img.mode == "RGBA"
        pixels: npt.NDArray[np.uint8] = np.asarray(img, dtype=np.uint8)
    return pixels


@pytest.mark.parametrize("stripe_bytes", [1, 5000, 1 << 20])
def test_one_pass_cutout_is_compose_then_encode_for_every_colour_and_alpha(
    stripe_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compose_module, "STRIPE_BYTES", stripe_bytes)
    values = np.arange(256, dtype=np.uint8)
    colour, alpha = np.meshgrid(values, values)  # 256 x 256: every pair
    img = Image.fromarray(np.dstack([colour, 255 - colour, colour.T]), "RGB")
    mask = Image.fromarray(np.ascontiguousarray(alpha), "L")
    two_pass = _decoded(encode(naive_cutout(img, mask), "png"))
    assert np.array_equal(_decoded(naive_cutout_png(img, mask)), two_pass)


def test_one_pass_cutout_takes_only_rgb_and_a_mask_of_its_size() -> None:
    mask = Image.new("L", (8, 8))
    with pytest.raises(ValueError, match="RGB image"):
        naive_cutout_png(gradient(8, 8, "RGBA"), mask)
    with pytest.raises(ValueError, match="RGB image"):
        naive_cutout_png(gradient(9, 8), mask)


def _soft_mask() -> npt.NDArray[np.uint8]:
    """A disc with a soft edge: LANCZOS and BICUBIC upscale it differently."""
    yy, xx = np.mgrid[:320, :320]
    radius = np.hypot(yy - 160, xx - 160)
    mask: npt.NDArray[np.uint8] = np.clip((120 - radius) * 8, 0, 255).astype(np.uint8)
    return mask


@pytest.mark.parametrize(
    ("options", "fmt", "mode"),
    [
        (CutoutOptions(), "png", "RGBA"),
        (CutoutOptions(only_mask=True), "png", "RGB"),
        (CutoutOptions(bgcolor=(0, 0, 255, 255)), "png", "RGB"),
        (CutoutOptions(post_process_mask=True), "png", "RGB"),
        (CutoutOptions(), "webp", "RGB"),
    ],
)
def test_fast_takes_every_option_and_input(
    options: CutoutOptions, fmt: OutputFormat, mode: str
) -> None:
    img = gradient(150, 100, mode)
    mask = _soft_mask()
    exact = finish(img, mask, options, fmt)
    quick = finish(img, mask, options, fmt, fidelity="fast")
    assert (quick.width, quick.height) == (exact.width, exact.height) == (150, 100)
    with Image.open(io.BytesIO(quick.body)) as out:
        assert out.size == (150, 100) and out.format == fmt.upper()


def test_the_request_option_overrides_the_service_setting() -> None:
    class SoftMask:
        async def __call__(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
            return _soft_mask()

    data = image_bytes(gradient(400, 300), "PNG")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    fidelities: tuple[Fidelity, ...] = ("exact", "fast")
    want = {f: finish(img, _soft_mask(), CutoutOptions(), fidelity=f).body for f in fidelities}
    assert want["exact"] != want["fast"]

    async def served(setting: Fidelity, asked: Fidelity | None) -> bytes:
        remover = Remover(
            RemoverConfig.of(AppSettings(fidelity=setting)), {"u2netp": SoftMask()}, threads=1
        )
        try:
            return (await remover.remove(Job(data, None, CutoutOptions(), "png", asked))).body
        finally:
            remover.close()

    assert asyncio.run(served("exact", None)) == want["exact"]
    assert asyncio.run(served("fast", None)) == want["fast"]
    assert asyncio.run(served("fast", "exact")) == want["exact"]
    assert asyncio.run(served("exact", "fast")) == want["fast"]


def test_fidelity_is_a_remove_option_and_not_rembgs() -> None:
    assert parse(RemoveQuery, {"fidelity": "fast"}).fidelity == "fast"
    assert parse(RemoveQuery, {}).fidelity is None  # the service's setting
    assert RemoveQuery(fidelity="fast").query_params() == {"fidelity": "fast"}
    with pytest.raises(OptionsError, match="fidelity"):
        parse(RemoveQuery, {"fidelity": "rough"})
    # /api/remove is rembg's contract: rembg's pixels, no such field.
    with pytest.raises(OptionsError, match="unknown parameter"):
        parse(RembgForm, {"fidelity": "fast"})


def test_exact_is_the_default_and_the_gpu_config_is_fast() -> None:
    assert AppSettings().fidelity == "exact"

    def args(path: Path) -> dict[str, object]:
        app = yaml.safe_load(path.read_text())["applications"][0]
        return dict(app["args"])

    assert args(ROOT / "serve_config.yaml")["fidelity"] == "exact"
    assert args(ROOT / "config" / "serve_config.gpu.yaml")["fidelity"] == "fast"
