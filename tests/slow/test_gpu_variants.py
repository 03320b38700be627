"""The GPU benchmark's model variants (fp16, normalisation in the graph) on the CPU: slow,
each runs u2netp in more sessions. fp16 runs on the CPU provider, whose kernels are
not the GPU's: the parity test bounds the conversion's error, not a GPU's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from conftest import FIXTURES, load_image
from deployments.bench import gpu as gpu_bench
from deployments.infer import OnnxModel
from deployments.models import EMBEDDED, MODEL_TABLE, ModelSpec
from deployments.preprocess import model_input
from deployments.runtime import RuntimeConfig

U2NETP = MODEL_TABLE["u2netp"]


def fixture_inputs(spec: ModelSpec) -> list[npt.NDArray[np.uint8]]:
    return [model_input(load_image(p), spec.size) for p in sorted(FIXTURES.glob("*.jpg"))]


@pytest.mark.slow
def test_fp16_u2netp_masks_stay_close_to_fp32(u2netp: OnnxModel) -> None:
    """fp16 on the CPU provider (the GPU's kernels differ): bound the masks' drift."""
    half = OnnxModel(EMBEDDED["u2netp"], U2NETP, RuntimeConfig(intra_op_threads=2, fp16=True), 1)
    images = fixture_inputs(U2NETP)
    for ours, theirs in zip(half.predict(images), u2netp.predict(images), strict=True):
        diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
        # Measured on the fixtures: 92-99% of pixels within 2 levels, mean diff < 1.
        assert (diff <= 2).mean() > 0.9
        assert diff.mean() < 2


@pytest.mark.slow
def test_gpu_bench_runs_prepared_variants_without_onnx(tmp_path: Path) -> None:
    # As on the GPU box, where `import onnx` fails: the files from --prepare load
    # as they are, the in-graph one takes uint8, the fp16 one float32.
    models, out = tmp_path / "models", tmp_path / "gpu.json"
    gpu_bench.prepare(U2NETP, EMBEDDED["u2netp"], models)
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "from deployments.bench import gpu\n"
        f"gpu.main(['--quick', '--cpu', '--models-dir', {str(models)!r}, '--out', {str(out)!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [v["name"] for v in result["variants"]] == ["fp32", "pre", "fp16"]
    assert all(v["error"] is None and v["batchable"] for v in result["variants"])
