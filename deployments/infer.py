"""Infer stage: an ONNX Runtime session that runs whole batches.

``OnnxModel`` loads a model file once (with the graph rewrites of
``deployments.graph`` that its ``RuntimeConfig`` asks for), checks that a batch of
2 gives its second image the mask a single run gives it (falling back to one run
per image when it does not),
warms every batch shape it will use, and turns the raw output into rembg's uint8
masks. Its runtime (providers, threads, GPU memory) comes from ``deployments.runtime``.
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
from deployments.graph import model_bytes_for
from deployments.models import ModelSpec
from deployments.preprocess import normalize_batch
from deployments.runtime import CUDA, RuntimeConfig, providers_for

logger = logging.getLogger(__name__)


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


# How ONNX Runtime reports running out of device memory: the CUDA runtime, cuDNN
# and cuBLAS's own codes, and the BFC arena hitting ``gpu_mem_limit`` (which says
# "Available memory of X is smaller than requested bytes of Y").
_OOM_MARKERS = (
    "out of memory",
    "failed to allocate memory",
    "available memory of",
    "cudaerrormemoryallocation",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device allocation failure, which a smaller batch may avoid."""
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


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
            model_bytes = model_bytes_for(path, spec, runtime)
            self.session = ort.InferenceSession(
                model_bytes,
                sess_options=self._session_options(),
                providers=providers_for(runtime),
            )
        except Exception as exc:
            raise ModelUnavailable(
                f"model {spec.name!r} could not be loaded from {path}: {exc}"
            ) from exc
        # ONNX Runtime would otherwise move a session whose provider fails at run
        # time to the CPU for good, in silence; here such a run fails instead.
        self.session.disable_fallback()
        self.provider = self.session.get_providers()[0]
        if runtime.use_gpu and self.provider != CUDA:
            raise ModelUnavailable(
                f"model {spec.name!r}: a GPU was assigned but ONNX Runtime runs on "
                f"{self.provider} (is onnxruntime-gpu installed with CUDA 13 and "
                "cuDNN 9 libraries?); refusing to serve slowly on the CPU"
            )
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        # A file whose input is uint8 normalises in its graph (with_preprocessing),
        # whether this process rewrote it or it was saved that way.
        self.takes_uint8 = model_input.type == "tensor(uint8)"
        self.report.load_s = time.perf_counter() - started
        checked = time.perf_counter()
        self.batchable = self._batch_equals_singles()
        self.report.warmup_s += time.perf_counter() - checked
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
        # ONNX Runtime keeps its memory pattern (buffers planned per input shape)
        # per calling thread: measured with u2netp at batch 4, a second thread
        # running the session took +770 MB; without the pattern +17 MB, at the
        # same speed on the CPU (1.50 images/s either way).
        options.enable_mem_pattern = False
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.runtime.allow_spinning else "0"
        )
        options.log_severity_level = 3
        return options

    def _probe(self, n: int) -> npt.NDArray[Any]:
        rng = np.random.default_rng(n)
        width, height = self.spec.size
        if self.takes_uint8:
            return rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
        return rng.standard_normal((n, 3, height, width), dtype=np.float32)

    def model_input(self, images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[Any]:
        """What the session takes for these uint8 (H, W, 3) model-size images:
        the stacked uint8 batch when the graph normalises, else rembg's float32."""
        if self.takes_uint8:
            return np.stack(images)
        return normalize_batch(images, self.spec)

    def _run(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        outputs = self.session.run(None, {self.input_name: batch})
        pred: npt.NDArray[np.float32] = outputs[self.spec.output][:, 0, :, :]
        return pred

    def _batch_equals_singles(self) -> bool:
        """A batch of 2 against a single run of its second image: an export that
        mixes the images of a batch (or computes only the first) shows there, and
        the two runs warm shapes 2 and 1 on the way."""
        probe = self._probe(2)
        try:
            together = self._run(probe)
        except Exception as exc:  # an export that reshapes with a fixed batch
            logger.warning("model %s: batch of 2 failed: %s", self.spec.name, exc)
            return False
        alone = self._run(probe[1:])
        # Both shapes have run: the warm-up need not run them again.
        self.report.shapes += [2, 1]
        # Bit-equal on the CPU. On a GPU, cuDNN picks an algorithm per shape and
        # runs float32 convolutions in TF32 (10-bit mantissa) by default, and an
        # fp16 model is coarser still: runs differ by ~1e-3 there. An export that
        # mixes the images of a batch differs by the signal itself (~0.1-1), so a
        # tolerance of 1e-2 still tells the two apart.
        coarse = self.runtime.use_gpu or self.runtime.fp16
        rtol, atol = (1e-2, 1e-2) if coarse else (1e-3, 1e-4)
        return together.shape[0] == 2 and bool(
            np.allclose(together[1:], alone, rtol=rtol, atol=atol)
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

    def predict(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[npt.NDArray[np.uint8]]:
        """uint8 (H, W, 3) model-size images -> uint8 (H, W) masks, one per image."""
        batch = self.model_input(images)
        preds: list[npt.NDArray[np.float32]] = []
        start = 0
        for take, shape in plan_chunks(len(images), self.buckets, self.runtime.use_gpu):
            preds.append(self._run_chunk(batch[start : start + take], shape))
            start += take
        return masks_from_output(np.concatenate(preds), self.spec)

    def _run_chunk(self, chunk: npt.NDArray[Any], shape: int) -> npt.NDArray[np.float32]:
        n = len(chunk)
        padded = chunk
        if shape > n:
            pad = np.zeros((shape - n, *chunk.shape[1:]), dtype=chunk.dtype)
            padded = np.concatenate([chunk, pad])
        try:
            return self._run(padded)[:n]
        except Exception as exc:
            smaller = [b for b in self.buckets if b < shape]
            if not is_out_of_memory(exc) or not smaller:
                raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc
            # Out of device memory: run the same images again in smaller shapes, all of
            # them warmed ones (a new shape would start cuDNN's timed search, which
            # needs workspace just when memory is short).
            plan = plan_chunks(n, smaller, self.runtime.use_gpu)
            logger.warning(
                "model %s: out of memory at batch shape %d; retrying as %s",
                self.spec.name,
                shape,
                "+".join(str(s) for _, s in plan),
            )
            parts, start = [], 0
            for take, sub_shape in plan:
                parts.append(self._run_chunk(chunk[start : start + take], sub_shape))
                start += take
            return np.concatenate(parts)
