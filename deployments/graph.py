"""Rewrites of a model's ONNX graph, applied to its bytes before the session is made.

``symbolic_batch`` lets a file exported with batch 1 take any batch;
``to_fp16`` (opt-in, GPU) stores float16 weights behind float32 IO;
``with_preprocessing`` (opt-in) moves rembg's normalisation into the graph.
They run on any device. The two opt-in ones need the ``onnx`` package, imported
when they run; the default path never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deployments.models import ModelSpec
from deployments.runtime import RuntimeConfig

# The name of the uint8 (N, H, W, 3) input that ``with_preprocessing`` adds.
IMAGE_INPUT = "image_uint8"


def symbolic_batch(model_bytes: bytes) -> bytes:
    """Rewrite the first dim of every graph input and output to a symbolic name.

    Edits the protobuf's bytes in place of ``onnx.load``: ``import onnx`` takes
    0.6-0.9 s (its ``ml_dtypes`` extension), which every replica start would pay
    for a rewrite of a few bytes. A file whose batch is already symbolic comes
    back as it is.
    """
    edited = _edit(model_bytes, {_GRAPH}, _graph_edit)
    return model_bytes if edited is None else edited


# The path from an ONNX ModelProto to a graph input's first dim, by field number
# (onnx.proto): ModelProto.graph -> GraphProto.input/output (ValueInfoProto) ->
# .type (TypeProto) -> .tensor_type -> .shape (TensorShapeProto) -> .dim[0],
# a Dimension whose oneof holds dim_value (a varint) or dim_param (a string).
_GRAPH, _INPUT, _OUTPUT, _TYPE, _TENSOR_TYPE, _SHAPE, _DIM = 7, 11, 12, 2, 1, 2, 1
_DIM_VALUE, _DIM_PARAM = 1, 2
_VARINT, _LENGTH_DELIMITED = 0, 2
_BATCH = b"batch"

Bytes = bytes | memoryview


def _read_varint(data: Bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(message: Bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, payload start, end) of each field."""
    pos = 0
    while pos < len(message):
        start = pos
        key, pos = _read_varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, end = _read_varint(message, pos)
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(message, pos)
            end = pos + length
        elif wire in (1, 5):  # fixed 64 and 32 bits
            end = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"not an ONNX model: protobuf wire type {wire}")
        if end > len(message):
            raise ValueError("not an ONNX model: a protobuf field runs past its message")
        yield number, wire, start, pos, end
        pos = end


def _edit(
    message: Bytes,
    numbers: set[int],
    edit: Callable[[memoryview], bytes | None],
    first_only: bool = False,
) -> bytes | None:
    """``message`` with each message field numbered in ``numbers`` replaced by
    ``edit`` of its payload where that gives bytes; None when nothing changed."""
    view = memoryview(message)
    parts: list[Bytes] = []
    copied = 0
    seen = False
    for number, wire, start, payload, end in _fields(view):
        if wire != _LENGTH_DELIMITED or number not in numbers or (first_only and seen):
            continue
        seen = True
        new = edit(view[payload:end])
        if new is None:
            continue
        key = _varint(number << 3 | _LENGTH_DELIMITED)
        parts += [view[copied:start], key, _varint(len(new)), new]
        copied = end
    if not parts:
        return None
    parts.append(view[copied:])
    return b"".join(parts)


def _symbolic_dim(dim: memoryview) -> bytes | None:
    fields = list(_fields(dim))
    if not any(n == _DIM_VALUE and w == _VARINT for n, w, *_ in fields):
        return None
    # dim_param replaces dim_value in their oneof; the denotation stays.
    rest = b"".join(dim[s:e] for n, _, s, _, e in fields if n not in (_DIM_VALUE, _DIM_PARAM))
    return _varint(_DIM_PARAM << 3 | _LENGTH_DELIMITED) + _varint(len(_BATCH)) + _BATCH + rest


def _graph_edit(graph: memoryview) -> bytes | None:
    def shape(m: memoryview) -> bytes | None:
        return _edit(m, {_DIM}, _symbolic_dim, first_only=True)

    def tensor(m: memoryview) -> bytes | None:
        return _edit(m, {_SHAPE}, shape)

    def type_(m: memoryview) -> bytes | None:
        return _edit(m, {_TENSOR_TYPE}, tensor)

    def value_info(m: memoryview) -> bytes | None:
        return _edit(m, {_TYPE}, type_)

    return _edit(graph, {_INPUT, _OUTPUT}, value_info)


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
