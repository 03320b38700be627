"""The GPU path, tested without a GPU: provider options, the arena limit,
bucketing, OOM detection, the two model rewrites, the device choice. The parts
that run the embedded model: tests/service/test_gpu_path_on_cpu.py and (slow)
tests/slow/test_gpu_variants.py.

No GPU runs here. Nothing is faked: what needs a card (CUDA kernels, timings,
memory) is not tested; the real ONNX Runtime (the GPU build, which falls back to
the CPU here) runs everything else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from conftest import FIXTURES, load_image
from deployments.bench import gpu as gpu_bench
from deployments.errors import ModelUnavailable
from deployments.graph import IMAGE_INPUT, to_fp16, with_preprocessing
from deployments.infer import OnnxModel, bucket_sizes, is_out_of_memory, plan_chunks
from deployments.models import EMBEDDED, MODEL_TABLE, ModelSpec, resolve_model_file, spec_for
from deployments.preprocess import model_input, normalize_batch
from deployments.runtime import (
    CPU,
    CUDA,
    RuntimeConfig,
    gpu_mem_limit_bytes,
    gpu_total_memory,
    providers_for,
    runtime_for,
    use_gpu_for,
)

GB = 10**9
U2NETP = MODEL_TABLE["u2netp"]


def fixture_inputs(spec: ModelSpec) -> list[npt.NDArray[np.uint8]]:
    return [model_input(load_image(p), spec.size) for p in sorted(FIXTURES.glob("*.jpg"))]


# -- Providers and the arena limit ---------------------------------------------------


def test_cpu_only_without_a_gpu() -> None:
    assert providers_for(RuntimeConfig()) == [CPU]
    assert providers_for(RuntimeConfig(gpu_mem_limit=GB)) == [CPU]


def cuda_options(runtime: RuntimeConfig) -> dict[str, Any]:
    providers = providers_for(runtime)
    assert providers[1:] == [CPU]  # the CPU provider takes what CUDA cannot run
    first = providers[0]
    assert isinstance(first, tuple) and first[0] == CUDA
    return first[1]


def test_cuda_options_with_a_gpu() -> None:
    options = cuda_options(RuntimeConfig(use_gpu=True, device_id=0, gpu_mem_limit=18 * GB))
    assert options["gpu_mem_limit"] == 18 * GB
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert options["device_id"] == 0


def test_cuda_without_a_known_card_size_leaves_the_arena_uncapped() -> None:
    assert "gpu_mem_limit" not in cuda_options(RuntimeConfig(use_gpu=True))


@pytest.mark.parametrize(
    ("fraction", "total", "want"),
    [
        (0.25, 80 * GB, 18 * GB),  # a quarter of an H100 80GB, less 10% headroom
        (0.5, 80 * GB, 36 * GB),
        (1.0, 80 * GB, 72 * GB),
        (0.25, 141 * GB, int(141 * GB * 0.25 * 0.9)),  # H200
        (0.1, 16 * GB, int(16 * GB * 0.1 * 0.9)),
    ],
)
def test_gpu_mem_limit_is_the_fraction_of_the_card(fraction: float, total: int, want: int) -> None:
    assert gpu_mem_limit_bytes(fraction, total) == want


@pytest.mark.parametrize("fraction", [0.0, -0.25, 1.5])
def test_gpu_mem_limit_refuses_a_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="GPU fraction"):
        gpu_mem_limit_bytes(fraction, 80 * GB)


def test_runtime_for_a_gpu_replica() -> None:
    asked: list[int | str] = []

    def card(device: int | str) -> int:
        asked.append(device)
        return 80 * GB

    runtime = runtime_for(3.5, [2], 0.25, fp16=True, total_memory=card)
    assert asked == [2]
    assert runtime.use_gpu and runtime.device_id == 0
    assert runtime.gpu_mem_limit == 18 * GB
    assert runtime.intra_op_threads == 4
    assert runtime.fp16


def test_runtime_for_a_cpu_replica_ignores_gpu_only_options() -> None:
    runtime = runtime_for(0.5, [], 0.25, fp16=True, preprocess_in_graph=True)
    assert not runtime.use_gpu
    assert runtime.gpu_mem_limit is None
    assert runtime.intra_op_threads == 1
    assert not runtime.fp16  # fp16 is slow on the CPU provider: GPU only
    assert runtime.preprocess_in_graph  # exact on either device


def test_runtime_for_an_unknown_card_size_leaves_the_arena_uncapped() -> None:
    runtime = runtime_for(1, ["GPU-8f1c5a2e"], 0.5, total_memory=lambda _: None)
    assert runtime.use_gpu
    assert runtime.gpu_mem_limit is None


# Where CUDA runs, these two have nothing to check; elsewhere (CI) they must hold.
needs_no_gpu = pytest.mark.skipif(
    CUDA in ort.get_available_providers() and gpu_total_memory(0) is not None,
    reason="this machine has a usable GPU",
)


@needs_no_gpu
def test_card_memory_is_unknown_without_a_gpu() -> None:
    # This machine has no GPU (and no NVML library or nvidia-smi).
    assert gpu_total_memory(0) is None


@needs_no_gpu
def test_asking_for_cuda_without_a_gpu_refuses_to_serve_on_cpu() -> None:
    with pytest.raises(ModelUnavailable, match="GPU was assigned"):
        OnnxModel(EMBEDDED["u2netp"], U2NETP, RuntimeConfig(use_gpu=True), 1)


# -- Bucketing and chunk planning ------------------------------------------------------


@pytest.mark.parametrize(
    ("max_batch", "want"),
    [(1, [1]), (2, [1, 2]), (7, [1, 2, 4]), (8, [1, 2, 4, 8]), (64, [1, 2, 4, 8, 16, 32, 64])],
)
def test_bucket_sizes(max_batch: int, want: list[int]) -> None:
    assert bucket_sizes(max_batch) == want


@given(n=st.integers(1, 300), max_batch=st.integers(1, 128), pad=st.booleans())
def test_chunks_cover_every_image_in_bucketed_shapes(n: int, max_batch: int, pad: bool) -> None:
    buckets = bucket_sizes(max_batch)
    chunks = plan_chunks(n, buckets, pad)
    assert sum(take for take, _ in chunks) == n
    assert all(shape in buckets and 1 <= take <= shape for take, shape in chunks)
    padded = [take < shape for take, shape in chunks]
    if pad:
        # Only the tail is padded, and to the smallest bucket that holds it.
        assert not any(padded[:-1])
        take, shape = chunks[-1]
        assert shape == min(b for b in buckets if b >= take)
    else:
        assert not any(padded)


# -- Out-of-memory detection ------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
        "running Conv node. CUDA failure 2: out of memory ; GPU=0",
        "BFCArena::AllocateRawInternal Available memory of 20971520 is smaller than "
        "requested bytes of 104857600",
        "Failed to allocate memory for requested buffer of size 104857600",
        "CUDNN failure 4: CUDNN_STATUS_ALLOC_FAILED ; GPU=0",
        "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED",
        "cudaErrorMemoryAllocation",
    ],
)
def test_device_allocation_failures_are_out_of_memory(message: str) -> None:
    assert is_out_of_memory(RuntimeError(message))


@pytest.mark.parametrize(
    "message",
    [
        "Got invalid dimensions for input: input.1 for the following indices",
        "CUDA failure 700: an illegal memory access was encountered",
        "CUDNN failure 3: CUDNN_STATUS_BAD_PARAM",
    ],
)
def test_other_failures_are_not_out_of_memory(message: str) -> None:
    assert not is_out_of_memory(RuntimeError(message))


# -- Normalisation in the graph --------------------------------------------------------


def identity_model(spec: ModelSpec, opset: int) -> bytes:
    """A model that returns its float32 (N, 3, H, W) input: shows what it was fed."""
    width, height = spec.size
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, height, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, height, width])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize("opset", [11, 17, 18, 21])
@pytest.mark.parametrize("name", ["u2netp", "isnet-general-use", "isnet-anime"])
def test_graph_normalisation_is_bit_equal_to_rembgs(name: str, opset: int) -> None:
    spec = ModelSpec(name, (96, 64), MODEL_TABLE[name].mean, MODEL_TABLE[name].std)
    rewritten = with_preprocessing(identity_model(spec, opset), spec)
    session = ort.InferenceSession(rewritten, providers=[CPU])
    assert session.get_inputs()[0].name == IMAGE_INPUT
    assert session.get_inputs()[0].type == "tensor(uint8)"
    images = fixture_inputs(spec)
    images.append(np.zeros_like(images[0]))  # all black: rembg's 1e-6 guard, no NaN
    images.append(np.full_like(images[0], 7))  # a dim image: max far from 255
    got = session.run(None, {IMAGE_INPUT: np.stack(images)})[0]
    want = normalize_batch(images, spec)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


# -- fp16 ---------------------------------------------------------------------------------


def conv_model() -> bytes:
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(
        rng.standard_normal((4, 3, 3, 3)).astype(np.float32), name="w"
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 14, 14])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "conv", [x], [y], [weight]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_fp16_keeps_float32_io_and_stores_float16_weights() -> None:
    converted = onnx.load_from_string(to_fp16(conv_model()))
    io_types = {
        v.type.tensor_type.elem_type for v in [*converted.graph.input, *converted.graph.output]
    }
    assert io_types == {TensorProto.FLOAT}
    assert [t.data_type for t in converted.graph.initializer] == [TensorProto.FLOAT16]
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    full = ort.InferenceSession(conv_model(), providers=[CPU]).run(None, {"x": x})[0]
    half = ort.InferenceSession(converted.SerializeToString(), providers=[CPU]).run(None, {"x": x})[
        0
    ]
    assert half.dtype == np.float32
    # float16 keeps ~3 significant digits.
    assert np.allclose(half, full, rtol=1e-2, atol=2e-2)


# -- The GPU benchmark, run on the CPU ------------------------------------------------------


def test_gpu_bench_imports_no_ray_pydantic_or_rembg() -> None:
    # It times the service's own stages and session, and nothing of Serve or rembg.
    code = (
        "import sys, deployments.bench.gpu, deployments.runtime, deployments.graph; "
        "bad = {m.split('.')[0] for m in sys.modules} & {'ray', 'rembg', 'onnx'}; "
        "print(sorted(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_bench_prepares_variants_that_load_without_rewriting(tmp_path: Path) -> None:
    written = gpu_bench.prepare(U2NETP, EMBEDDED["u2netp"], tmp_path)
    assert sorted(p.name for p in written) == [
        "u2netp.fp16.onnx",
        "u2netp.fp32.onnx",
        "u2netp.pre.onnx",
    ]
    inputs = {p.name: onnx.load(str(p)).graph.input[0].type.tensor_type for p in written}
    assert inputs["u2netp.pre.onnx"].elem_type == TensorProto.UINT8
    assert inputs["u2netp.fp16.onnx"].elem_type == TensorProto.FLOAT
    # The batch dimension is symbolic in every file: no onnx needed where they run.
    assert all(t.shape.dim[0].dim_param == "batch" for t in inputs.values())


@pytest.mark.parametrize(
    ("device", "gpus", "want"),
    [("auto", 0, False), ("auto", 1, True), ("cpu", 4, False), ("gpu", 0, True)],
)
def test_device_choice(device: str, gpus: float, want: bool) -> None:
    assert use_gpu_for(device, gpus) is want


def test_cuda_is_absent_so_the_model_refuses_a_fake_gpu() -> None:
    # No CUDA runs here: given a GPU, ONNX Runtime falls back to the CPU and
    # OnnxModel (so ModelServer) refuses to start rather than serve slowly.
    # Hence the probe deployments that stand in for it on fake GPUs.
    try:
        model = OnnxModel(
            resolve_model_file("u2netp"), spec_for("u2netp"), RuntimeConfig(use_gpu=True)
        )
    except ModelUnavailable as exc:
        assert "refusing to serve slowly on the CPU" in str(exc)
        return
    pytest.skip(f"CUDA runs on this machine ({model.provider}): nothing to refuse")
