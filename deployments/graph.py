"""Rewrites of a model's ONNX graph, applied to its bytes before the session is made.

``symbolic_batch`` lets a file exported with batch 1 take any batch;
``to_fp16`` (opt-in, GPU) stores float16 weights behind float32 IO;
``with_preprocessing`` (opt-in) moves rembg's normalisation into the graph.
They run on any device; they need the ``onnx`` package, imported when they run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from deployments.models import ModelSpec
from deployments.runtime import RuntimeConfig

logger = logging.getLogger(__name__)

# The name of the uint8 (N, H, W, 3) input that ``with_preprocessing`` adds.
IMAGE_INPUT = "image_uint8"


def symbolic_batch(model_bytes: bytes) -> bytes:
    """Rewrite the first dim of every graph input and output to a symbolic name.

    Without the ``onnx`` package (a bare GPU box) the bytes are returned as they
    are: a file whose batch is already symbolic loses nothing, and one fixed at 1
    fails the batch check and runs one image at a time.
    """
    try:
        import onnx
    except ImportError:
        logger.warning("onnx is not installed: the model's batch dimension is kept")
        return model_bytes

    model = onnx.load_from_string(model_bytes)
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
            changed = True
    return model.SerializeToString() if changed else model_bytes


def model_bytes_for(path: Path, spec: ModelSpec, runtime: RuntimeConfig) -> bytes:
    """The model file's bytes with the rewrites ``runtime`` asks for applied."""
    model_bytes = symbolic_batch(path.read_bytes())
    if runtime.fp16:
        model_bytes = to_fp16(model_bytes)
    if runtime.preprocess_in_graph:
        model_bytes = with_preprocessing(model_bytes, spec)
    return model_bytes


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
