"""Infer stage: an ONNX Runtime session that runs whole batches.

``OnnxModel`` loads a model file once, makes its batch dimension symbolic when the
file fixes it to 1, checks that a batch of 2 equals two single runs (falling back
to one run per image when it does not), warms every batch shape it will use, and
turns the raw output into rembg's uint8 masks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from deployments.errors import InferenceFailed, ModelUnavailable
from deployments.models import ModelSpec
from deployments.preprocess import normalize_batch

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class RuntimeConfig:
    """How a replica runs its session; derived from what Ray assigned it."""

    use_gpu: bool = False
    device_id: int = 0
    intra_op_threads: int = 1
    # Bytes of GPU memory this session's arena may take: its GPU fraction of the card.
    gpu_mem_limit: int | None = None
    # EXHAUSTIVE benchmarks every cuDNN algorithm once per input shape; bucketed
    # shapes are all warmed in __init__, so the search is paid before ready.
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    # Spinning intra-op threads burn the cores that decode/encode need.
    allow_spinning: bool = False


def providers_for(config: RuntimeConfig) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers in preference order: CUDA first only with a GPU."""
    if not config.use_gpu:
        return [CPU]
    cuda: dict[str, Any] = {
        "device_id": config.device_id,
        # Grow the arena by what is asked, not by doubling: replicas share a card.
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
        "do_copy_in_default_stream": True,
    }
    if config.gpu_mem_limit is not None:
        cuda["gpu_mem_limit"] = config.gpu_mem_limit
    return [(CUDA, cuda), CPU]


def gpu_mem_limit_bytes(fraction: float, total_bytes: int, headroom: float = 0.9) -> int:
    """The arena limit for a replica holding ``fraction`` of a card of ``total_bytes``.

    ``headroom`` leaves room outside the arena (CUDA context, cuDNN workspaces),
    which ORT does not count against ``gpu_mem_limit``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"GPU fraction must be in (0, 1], got {fraction}")
    return int(total_bytes * fraction * headroom)


def bucket_sizes(max_batch_size: int) -> list[int]:
    """The batch shapes a session sees: powers of two up to ``max_batch_size``."""
    sizes = [1]
    while sizes[-1] * 2 <= max_batch_size:
        sizes.append(sizes[-1] * 2)
    return sizes


def plan_chunks(n: int, buckets: Sequence[int], pad: bool) -> list[tuple[int, int]]:
    """Split ``n`` images into runs of bucketed shapes: (images, run shape) pairs.

    Without padding (CPU: compute grows with the batch, so padding is waste) the
    runs are the binary decomposition, e.g. 7 -> 4+2+1. With padding (GPU: a run
    costs about the same up to its bucket) the tail is padded up, e.g. 7 -> 8.
    """
    chunks: list[tuple[int, int]] = []
    while n > 0:
        largest_fit = max(b for b in buckets if b <= n)
        if pad:
            bigger = [b for b in buckets if b >= n]
            shape = min(bigger) if bigger else largest_fit
        else:
            shape = largest_fit
        take = min(shape, n)
        chunks.append((take, shape))
        n -= take
    return chunks


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "failed to allocate memory" in text


def masks_from_output(
    pred: npt.NDArray[np.float32], spec: ModelSpec
) -> list[npt.NDArray[np.uint8]]:
    """Raw (N, H, W) model output -> uint8 masks, per image as rembg does.

    rembg applies the model's activation, min-max scales each mask to [0, 1] and
    truncates ``mask * 255`` to uint8. A constant mask would divide by zero in
    rembg; here it becomes all zeros.
    """
    masks = []
    for one in pred:
        if spec.activation == "sigmoid":
            one = 1 / (1 + np.exp(-one))
        hi, lo = one.max(), one.min()
        if hi == lo:
            masks.append(np.zeros(one.shape, dtype=np.uint8))
            continue
        masks.append((((one - lo) / (hi - lo)) * 255).astype(np.uint8))
    return masks


def _symbolic_batch(model_bytes: bytes) -> bytes:
    """Rewrite the first dim of every graph input and output to a symbolic name."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
            changed = True
    return model.SerializeToString() if changed else model_bytes


@dataclass
class WarmupReport:
    load_s: float = 0.0
    warmup_s: float = 0.0
    shapes: list[int] = field(default_factory=list)


class OnnxModel:
    """One model's session, warm at every batch shape up to ``max_batch_size``."""

    def __init__(
        self,
        path: Path,
        spec: ModelSpec,
        runtime: RuntimeConfig,
        max_batch_size: int = 1,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.report = WarmupReport()
        started = time.perf_counter()
        try:
            model_bytes = _symbolic_batch(path.read_bytes())
            self.session = ort.InferenceSession(
                model_bytes,
                sess_options=self._session_options(),
                providers=providers_for(runtime),
            )
        except Exception as exc:
            raise ModelUnavailable(
                f"model {spec.name!r} could not be loaded from {path}: {exc}"
            ) from exc
        self.provider = self.session.get_providers()[0]
        if runtime.use_gpu and self.provider != CUDA:
            raise ModelUnavailable(
                f"model {spec.name!r}: a GPU was assigned but ONNX Runtime runs on "
                f"{self.provider} (is onnxruntime-gpu installed with CUDA 13 and "
                "cuDNN 9 libraries?); refusing to serve slowly on the CPU"
            )
        self.input_name = self.session.get_inputs()[0].name
        self.report.load_s = time.perf_counter() - started
        self.batchable = self._batch_equals_singles()
        if not self.batchable:
            logger.warning(
                "model %s: a batch of 2 differs from two single runs; "
                "running one image at a time inside each batch",
                spec.name,
            )
        self.buckets: list[int] = []
        self.warm(max_batch_size)

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.runtime.intra_op_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.runtime.allow_spinning else "0"
        )
        options.log_severity_level = 3
        return options

    def _probe(self, n: int) -> npt.NDArray[np.float32]:
        rng = np.random.default_rng(n)
        width, height = self.spec.size
        return rng.standard_normal((n, 3, height, width), dtype=np.float32)

    def _run(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        outputs = self.session.run(None, {self.input_name: batch})
        pred: npt.NDArray[np.float32] = outputs[self.spec.output][:, 0, :, :]
        return pred

    def _batch_equals_singles(self) -> bool:
        probe = self._probe(2)
        try:
            together = self._run(probe)
        except Exception as exc:  # an export that reshapes with a fixed batch
            logger.warning("model %s: batch of 2 failed: %s", self.spec.name, exc)
            return False
        apart = np.concatenate([self._run(probe[:1]), self._run(probe[1:])])
        # Bit-equal on the CPU; GPU kernels may pick other algorithms per shape.
        return together.shape == apart.shape and bool(
            np.allclose(together, apart, rtol=1e-3, atol=1e-4)
        )

    def warm(self, max_batch_size: int) -> None:
        """Run every bucketed batch shape not yet run; idempotent."""
        wanted = bucket_sizes(max_batch_size) if self.batchable else [1]
        started = time.perf_counter()
        for n in wanted:
            if n not in self.report.shapes:
                self._run(self._probe(n))
                self.report.shapes.append(n)
        self.report.warmup_s += time.perf_counter() - started
        self.buckets = wanted

    def predict(
        self, images: Sequence[npt.NDArray[np.uint8]]
    ) -> list[npt.NDArray[np.uint8]]:
        """uint8 (H, W, 3) model-size images -> uint8 (H, W) masks, one per image."""
        batch = normalize_batch(images, self.spec)
        preds: list[npt.NDArray[np.float32]] = []
        start = 0
        for take, shape in plan_chunks(len(images), self.buckets, self.runtime.use_gpu):
            preds.append(self._run_chunk(batch[start : start + take], shape))
            start += take
        return masks_from_output(np.concatenate(preds), self.spec)

    def _run_chunk(
        self, chunk: npt.NDArray[np.float32], shape: int
    ) -> npt.NDArray[np.float32]:
        n = len(chunk)
        padded = chunk
        if shape > n:
            pad = np.zeros((shape - n, *chunk.shape[1:]), dtype=np.float32)
            padded = np.concatenate([chunk, pad])
        try:
            return self._run(padded)[:n]
        except Exception as exc:
            if not is_out_of_memory(exc) or n == 1:
                raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc
            # Out of device memory: retry at half size rather than fail the batch.
            half = n // 2
            logger.warning(
                "model %s: out of memory at batch %d; retrying as %d + %d",
                self.spec.name,
                n,
                half,
                n - half,
            )
            return np.concatenate(
                [self._run_chunk(chunk[:half], half), self._run_chunk(chunk[half:], n - half)]
            )
