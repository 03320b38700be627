"""Pure pipeline stages, no Ray and no real model: decode, preprocess, infer (on tiny
models), compose, encode. The embedded model: tests/service/test_embedded_model.py."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from PIL import _imaging as pillow_core
from rembg.bg import naive_cutout as rembg_naive_cutout

from conftest import gradient, image_bytes
from deployments import encode as encode_module
from deployments.compose import compose, naive_cutout
from deployments.decode import Limits, decode
from deployments.encode import encode
from deployments.errors import PayloadTooLarge, UnsupportedImage
from deployments.graph import symbolic_batch
from deployments.infer import OnnxModel, masks_from_output, plan_chunks
from deployments.memory import release_image_memory, reuse_image_memory
from deployments.models import EMBEDDED, MODEL_TABLE, ModelSpec, spec_for, store_candidates
from deployments.options import CutoutOptions
from deployments.pipeline import sample_jpeg
from deployments.preprocess import model_input, normalize_batch, pack_mask, unpack_mask
from deployments.runtime import RuntimeConfig


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1"])
def test_decode_gives_rgb_or_rgba(mode: str) -> None:
    img = gradient(mode=mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = decode(image_bytes(img, fmt), Limits())
    assert out.mode == ("RGBA" if mode in ("RGBA", "LA") else "RGB")
    assert out.size == (64, 48)


def test_decode_keeps_palette_transparency() -> None:
    img = gradient().convert("P")
    img.info["transparency"] = 0
    out = decode(image_bytes(img, "PNG", transparency=0), Limits())
    assert out.mode == "RGBA"
    assert np.asarray(out)[..., 3].min() == 0


def test_decode_scales_16_bit_instead_of_clipping() -> None:
    values = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    out = decode(image_bytes(Image.fromarray(values), "PNG"), Limits())
    gray = np.asarray(out)[..., 0]
    assert out.mode == "RGB"
    # Scaled: the brightest pixel is near white and the image is not mostly white.
    assert gray.max() >= 250
    assert (gray == 255).mean() < 0.05


def test_decode_applies_exif_orientation() -> None:
    img = gradient(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode(image_bytes(img, "JPEG", exif=exif.tobytes()), Limits())
    assert out.size == (48, 64)


def test_decode_takes_first_frame_of_animation() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode(data, Limits())
    assert out.getpixel((0, 0))[:3] == (255, 0, 0)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", UnsupportedImage),
        (b"hello, not an image", UnsupportedImage),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", UnsupportedImage),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", UnsupportedImage),
        (image_bytes(gradient(), "JPEG")[:200], UnsupportedImage),
        (image_bytes(gradient(), "PNG")[:60], UnsupportedImage),
    ],
)
def test_decode_refuses_bad_input(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(data, Limits())


def test_decode_refuses_too_many_pixels_before_decoding() -> None:
    big = image_bytes(Image.new("L", (4000, 3000)), "PNG")
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode(big, Limits(max_pixels=10_000_000))


def test_decode_refuses_a_long_side() -> None:
    with pytest.raises(PayloadTooLarge, match="side"):
        decode(image_bytes(Image.new("L", (5000, 1)), "PNG"), Limits(max_side=4000))


def test_model_input_is_model_size_uint8() -> None:
    arr = model_input(gradient(100, 50, "RGBA"), (320, 320))
    assert arr.shape == (320, 320, 3) and arr.dtype == np.uint8


def _rembg_normalize(img: npt.NDArray[np.uint8], spec: ModelSpec) -> npt.NDArray[np.float32]:
    """rembg's BaseSession.normalize, written out."""
    scaled = img / max(np.max(img), 1e-6)
    want = np.zeros(img.shape)
    for c in range(3):
        want[:, :, c] = (scaled[:, :, c] - spec.mean[c]) / spec.std[c]
    return want.transpose((2, 0, 1)).astype(np.float32)


def test_normalize_matches_rembg_arithmetic_bit_for_bit() -> None:
    spec = spec_for("u2netp")
    noise = np.random.default_rng(7).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    images = [
        np.asarray(gradient(320, 320)),
        noise,
        noise // 3,  # its own maximum, not 255
        np.zeros((320, 320, 3), dtype=np.uint8),  # rembg's 1e-6 guard, no NaN
        np.full((320, 320, 3), 7, dtype=np.uint8),
    ]
    ours = normalize_batch(images, spec)
    assert ours.dtype == np.float32 and ours.shape == (len(images), 3, 320, 320)
    for got, img in zip(ours, images, strict=True):
        assert np.array_equal(got.view(np.uint32), _rembg_normalize(img, spec).view(np.uint32))


def test_constant_mask_gives_zeros_not_nan() -> None:
    masks = masks_from_output(np.full((2, 8, 8), 0.5, dtype=np.float32), spec_for("u2netp"))
    assert all(m.dtype == np.uint8 and m.max() == 0 for m in masks)


@pytest.mark.parametrize(
    ("n", "pad", "want"),
    [
        (7, False, [(4, 4), (2, 2), (1, 1)]),
        (7, True, [(7, 8)]),
        (3, True, [(3, 4)]),
        (8, False, [(8, 8)]),
        (20, True, [(8, 8), (8, 8), (4, 4)]),
    ],
)
def test_plan_chunks(n: int, pad: bool, want: list[tuple[int, int]]) -> None:
    assert plan_chunks(n, [1, 2, 4, 8], pad) == want


def channel_model(tmp_path: Path, mixes_the_batch: bool) -> Path:
    """A stand-in of u2netp's shape whose output is its input, less the batch's
    mean when ``mixes_the_batch`` (as an export that normalises over the batch)."""
    shape = ["batch", 3, 320, 320]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    if mixes_the_batch:
        nodes = [
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "mean"], ["y"]),
        ]
    else:
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "channel", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / f"mix-{mixes_the_batch}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("mixes_the_batch", [False, True])
def test_a_model_that_mixes_its_batch_runs_one_image_at_a_time(
    tmp_path: Path, mixes_the_batch: bool
) -> None:
    model = OnnxModel(
        channel_model(tmp_path, mixes_the_batch), spec_for("u2netp"), RuntimeConfig(), 4
    )
    assert model.batchable is not mixes_the_batch
    assert model.buckets == ([1] if mixes_the_batch else [1, 2, 4])
    # Either way each image gets what a run of its own gives it.
    images = [model_input(gradient(90 + 10 * i, 60), (320, 320)) for i in range(3)]
    together = model.predict(images)
    for image, mask in zip(images, together, strict=True):
        assert np.array_equal(model.predict([image])[0], mask)


def onnx_symbolic_batch(model_bytes: bytes) -> bytes:
    """The rewrite done with the onnx package: the reference for the byte editor."""
    model = onnx.load_from_string(model_bytes)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    return bytes(model.SerializeToString())


def odd_shapes_model() -> bytes:
    """Fixed, denoted, symbolic, scalar and unranked inputs; an initializer listed
    as an input (old exports); outputs fixed and symbolic."""
    fixed = helper.make_tensor_value_info("fixed", TensorProto.FLOAT, [1, 3, 4, 4])
    fixed.type.tensor_type.shape.dim[0].denotation = "DATA_BATCH"
    named = helper.make_tensor_value_info("named", TensorProto.FLOAT, ["n", 3, 4, 4])
    scalar = helper.make_tensor_value_info("scalar", TensorProto.FLOAT, [])
    unranked = helper.make_tensor_value_info("unranked", TensorProto.FLOAT, None)
    weight = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 1, 1])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])
    same = helper.make_tensor_value_info("same", TensorProto.FLOAT, ["n", 3, 4, 4])
    nodes = [
        helper.make_node("Mul", ["fixed", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "scalar"], ["out"]),
        helper.make_node("Identity", ["named"], ["same"]),
        helper.make_node("Identity", ["unranked"], ["unused"]),
    ]
    initializer = numpy_helper.from_array(np.ones((3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        nodes, "odd", [fixed, named, scalar, unranked, weight], [out, same], [initializer]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize("which", ["u2netp", "odd shapes"])
def test_symbolic_batch_edits_the_bytes_as_onnx_would(which: str) -> None:
    original = EMBEDDED["u2netp"].read_bytes() if which == "u2netp" else odd_shapes_model()
    edited = symbolic_batch(original)
    assert onnx.load_from_string(edited) == onnx.load_from_string(onnx_symbolic_batch(original))
    assert edited != original
    # Already symbolic: the same bytes back.
    assert symbolic_batch(edited) is edited


def test_symbolic_batch_refuses_what_is_not_a_model() -> None:
    with pytest.raises((ValueError, IndexError)):
        symbolic_batch(b"\x3a\xff\xff\xff\x0f" + b"short")


def test_compose_options() -> None:
    img = gradient(40, 30)
    mask = Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1)), "L")
    only = compose(img, mask, CutoutOptions(only_mask=True))
    assert only.mode == "L" and np.array_equal(np.asarray(only), np.asarray(mask))
    colored = compose(img, mask, CutoutOptions(bgcolor=(0, 0, 255, 255)))
    assert colored.mode == "RGBA" and colored.getpixel((0, 0)) == (0, 0, 255, 255)
    matted = compose(img, mask, CutoutOptions(alpha_matting=True))
    assert matted.size == img.size and matted.mode == "RGBA"


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("webp", b"RIFF")])
def test_encode(fmt: str, magic: bytes) -> None:
    body = encode(gradient(mode="RGBA"), fmt)  # type: ignore[arg-type]
    assert body.startswith(magic)
    assert Image.open(io.BytesIO(body)).size == (64, 48)


def test_warm_up_image_is_a_photo_sized_jpeg_the_decoder_takes() -> None:
    # The ingress warms its whole path with it before it reports ready.
    image = decode(sample_jpeg(Limits()), Limits())
    assert image.size == (2048, 1536) and image.mode == "RGB"
    assert np.asarray(image).std() > 20  # structure, not a flat colour
    # Shrunk to what tight limits accept, so the warm-up is never refused.
    tight = Limits(max_pixels=1000, max_side=30)
    assert decode(sample_jpeg(tight), tight).size == (30, 22)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (301, 211)])
@pytest.mark.parametrize("stripe_bytes", [1, 1000, 4 << 20])
def test_fast_png_keeps_every_pixel(
    mode: str, size: tuple[int, int], stripe_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any stripe height (one row, a few, the whole image) decodes to the input."""
    monkeypatch.setattr(encode_module, "_STRIPE_BYTES", stripe_bytes)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    pixels = np.random.default_rng(sum(size)).integers(0, 256, shape, dtype=np.uint8)
    body = encode(Image.fromarray(pixels, mode), "png", 1)
    # Signature, then IHDR, IDAT, IEND, each with its length and CRC right.
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    at, kinds = 8, []
    while at < len(body):
        (length,) = struct.unpack(">I", body[at : at + 4])
        kind, data = body[at + 4 : at + 8], body[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", body[at + 8 + length : at + 12 + length])
        assert len(data) == length and crc == zlib.crc32(kind + data), kind
        kinds.append(kind)
        at += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    decoded = Image.open(io.BytesIO(body))
    assert decoded.format == "PNG" and decoded.mode == mode
    assert np.array_equal(np.asarray(decoded), pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_naive_cutout_equals_rembgs_for_every_colour_and_alpha(mode: str) -> None:
    """Every (channel value, mask value) pair, in every channel."""
    values = np.arange(256, dtype=np.uint8)
    colour, alpha = np.meshgrid(values, values)  # 256 x 256: all pairs
    channels = [colour, 255 - colour, colour[::-1], colour.T][: len(mode)]
    img = Image.fromarray(np.dstack(channels), mode)
    mask = Image.fromarray(np.ascontiguousarray(alpha), "L")
    ours, theirs = naive_cutout(img, mask), rembg_naive_cutout(img, mask)
    assert ours.mode == theirs.mode == "RGBA"
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_naive_cutout_equals_rembgs(mode: str) -> None:
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (53, 71, len(mode)), dtype=np.uint8), mode)
    mask = Image.fromarray(rng.integers(0, 256, (53, 71), dtype=np.uint8), "L")
    ours, theirs = naive_cutout(img, mask), rembg_naive_cutout(img, mask)
    assert ours.mode == theirs.mode == "RGBA"
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"REMBG_HOME": "/srv/rembg"},
        {"U2NET_HOME": "/srv/u2net"},
        {"XDG_DATA_HOME": "/srv/xdg"},
        {"U2NET_HOME": "/srv/u2net", "REMBG_HOME": "/srv/rembg"},
    ],
)
def test_store_paths_are_rembgs(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The model store's layout, written out (so that serving never imports rembg),
    is the one rembg's own session classes give, for every model in the table."""
    from rembg.sessions import sessions

    for name in ("U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in MODEL_TABLE:
        session = sessions[name]
        want = [
            Path(session.model_dir()) / f"{name}.onnx",
            Path(session.legacy_home()) / f"{name}.onnx",
        ]
        assert store_candidates(name) == want, name


def test_image_memory_is_reused_then_given_back() -> None:
    """With ``reuse_image_memory`` the next image takes the blocks the last one
    freed (no fresh pages to fault in); ``release_image_memory`` empties the cache."""
    before = pillow_core.get_blocks_max()
    try:
        reuse_image_memory(100_000_000)
        assert pillow_core.get_blocks_max() == -(-100_000_000 * 4 // pillow_core.get_block_size())
        data = sample_jpeg(Limits())
        decode(data, Limits())
        reused = pillow_core.get_stats()["reused_blocks"]
        decode(data, Limits())
        assert pillow_core.get_stats()["reused_blocks"] > reused
        assert pillow_core.get_stats()["blocks_cached"] > 0
        release_image_memory()
        assert pillow_core.get_stats()["blocks_cached"] == 0
    finally:
        pillow_core.set_blocks_max(before)
        release_image_memory()


def test_packed_mask_round_trips_and_refuses_a_wrong_size() -> None:
    mask = np.random.default_rng(3).integers(0, 256, (320, 320), dtype=np.uint8)
    packed = pack_mask(mask)
    assert np.array_equal(unpack_mask(packed, (320, 320)), mask)
    with pytest.raises(ValueError):
        unpack_mask(packed, (320, 321))
