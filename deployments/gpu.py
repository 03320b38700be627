"""The GPU path's helpers: the card's memory, and two opt-in model rewrites.

``runtime_for`` turns what Ray assigned a replica (CPUs, GPU ids, GPU fraction)
into a ``RuntimeConfig`` whose CUDA arena is capped at that fraction of the card.
``to_fp16`` and ``with_preprocessing`` rewrite a model's bytes before its session
is made; both need the ``onnx`` package, which is imported only when they run.
Nothing here needs a GPU, Ray, pydantic or rembg to import.
"""

from __future__ import annotations

import logging
import math
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deployments.infer import RuntimeConfig, gpu_mem_limit_bytes
from deployments.models import ModelSpec

logger = logging.getLogger(__name__)

# The name of the uint8 (N, H, W, 3) input that ``with_preprocessing`` adds.
IMAGE_INPUT = "image_uint8"


def gpu_total_memory(device: int | str) -> int | None:
    """The card's memory in bytes, or None when it cannot be read.

    ``device`` is what Ray reports in ``ray.get_gpu_ids()``: an index, or a
    GPU UUID when CUDA_VISIBLE_DEVICES holds UUIDs. NVML (nvidia-ml-py) is asked
    first; ``nvidia-smi`` is the fallback where the binding is not installed.
    """
    total = _nvml_total(device)
    return total if total is not None else _smi_total(device)


def _nvml_total(device: int | str) -> int | None:
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            if isinstance(device, str) and not device.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByUUID(device)
            else:
                # NVML counts in PCI bus order and CUDA fastest-first: they agree
                # on nodes of one GPU model, which are the ones that share a card
                # size anyway, so an index mix-up cannot change the answer there.
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(device))
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        logger.warning("NVML could not read GPU %s's memory: %s", device, exc)
        return None


def _smi_total(device: int | str) -> int | None:
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                f"--id={device}",
                "--query-gpu=memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) * 1024 * 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def runtime_for(
    cpus: float,
    gpu_ids: Sequence[int | str],
    num_gpus: float,
    *,
    fp16: bool = False,
    preprocess_in_graph: bool = False,
    total_memory: Callable[[int | str], int | None] = gpu_total_memory,
) -> RuntimeConfig:
    """A replica's runtime from what Ray assigned it.

    The GPU path is taken only when Ray gave the replica a GPU and a fraction
    was asked for. The arena limit is that fraction of the card (less headroom);
    when the card's memory cannot be read the arena is left uncapped and a
    warning says so, since replicas sharing the card may then starve each other.
    """
    use_gpu = bool(gpu_ids) and num_gpus > 0
    limit = None
    if use_gpu:
        total = total_memory(gpu_ids[0])
        if total:
            limit = gpu_mem_limit_bytes(num_gpus, total)
        else:
            logger.warning("GPU memory unknown (install nvidia-ml-py): the CUDA arena is uncapped")
    return RuntimeConfig(
        use_gpu=use_gpu,
        # Ray sets CUDA_VISIBLE_DEVICES to the assigned card: it is device 0 here.
        device_id=0,
        intra_op_threads=max(1, math.ceil(cpus)),
        gpu_mem_limit=limit,
        fp16=fp16 and use_gpu,
        preprocess_in_graph=preprocess_in_graph,
    )


def to_fp16(model_bytes: bytes) -> bytes:
    """The model with float16 weights and arithmetic, float32 inputs and outputs.

    ORT's own converter (``onnxruntime.transformers.float16``) keeps the graph's
    IO types, so callers feed and read float32 exactly as before; ops it knows
    to be unsafe in float16 stay float32 behind Casts.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load_from_string(model_bytes)
    converted = convert_float_to_float16(model, keep_io_types=True)
    return bytes(converted.SerializeToString())


def with_preprocessing(model_bytes: bytes, spec: ModelSpec) -> bytes:
    """The model behind rembg's normalisation, done in the graph.

    The new input ``image_uint8`` takes the model-size images as they come from
    the resize: uint8 (N, H, W, 3). The prepended nodes compute, per image,
    ``(x / max(x.max(), 1e-6) - mean) / std`` in float64 and then cast to float32,
    the same IEEE operations in the same order as rembg's numpy code, so the
    model sees bit-identical input; then transpose to (N, 3, H, W).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    old = graph.input[0]
    old_type = old.type.tensor_type.elem_type
    width, height = spec.size
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 11)

    def const(name: str, value: Any) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name=f"pre_{name}")

    initializers = [
        const("floor", np.array(1e-6, dtype=np.float64)),
        const("mean", np.array(spec.mean, dtype=np.float64).reshape(1, 1, 1, 3)),
        const("std", np.array(spec.std, dtype=np.float64).reshape(1, 1, 1, 3)),
    ]
    reduce_inputs = ["pre_x"]
    reduce_attrs: dict[str, Any] = {"keepdims": 1}
    if opset >= 18:  # ReduceMax's axes became an input in opset 18
        initializers.append(const("axes", np.array([1, 2, 3], dtype=np.int64)))
        reduce_inputs.append("pre_axes")
    else:
        reduce_attrs["axes"] = [1, 2, 3]
    nodes = [
        helper.make_node("Cast", [IMAGE_INPUT], ["pre_x"], to=TensorProto.DOUBLE),
        helper.make_node("ReduceMax", reduce_inputs, ["pre_max"], **reduce_attrs),
        # rembg's guard against an all-black image: 0 / 1e-6 is 0, not NaN.
        helper.make_node("Max", ["pre_max", "pre_floor"], ["pre_div"]),
        helper.make_node("Div", ["pre_x", "pre_div"], ["pre_scaled"]),
        helper.make_node("Sub", ["pre_scaled", "pre_mean"], ["pre_centred"]),
        helper.make_node("Div", ["pre_centred", "pre_std"], ["pre_norm"]),
        helper.make_node("Cast", ["pre_norm"], ["pre_cast"], to=old_type),
        helper.make_node("Transpose", ["pre_cast"], [old.name], perm=[0, 3, 1, 2]),
    ]
    image = helper.make_tensor_value_info(
        IMAGE_INPUT, TensorProto.UINT8, ["batch", height, width, 3]
    )
    graph.input.remove(old)
    graph.input.insert(0, image)
    graph.initializer.extend(initializers)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
