"""The embedded model (u2netp) in process, without Ray: a batch equals single runs, warm
shapes, loading without onnx, the in-process pipeline equals rembg."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_IMAGES, assert_parity, gradient
from deployments.infer import OnnxModel
from deployments.pipeline import remove
from deployments.preprocess import model_input


def test_batch_of_n_equals_n_single_runs(u2netp: OnnxModel) -> None:
    images = [model_input(gradient(90 + 10 * i, 60), (320, 320)) for i in range(3)]
    together = u2netp.predict(images)
    for image, mask in zip(images, together, strict=True):
        assert np.array_equal(u2netp.predict([image])[0], mask)


def test_model_is_batched_and_warm(u2netp: OnnxModel) -> None:
    assert u2netp.batchable
    # Each shape ran once: 2 and 1 in the batch check, then 4.
    assert u2netp.report.shapes == [2, 1, 4]
    assert u2netp.provider == "CPUExecutionProvider"


def test_the_default_model_loads_without_the_onnx_package() -> None:
    # `import onnx` costs a replica 0.6-0.9 s: the default path does without it.
    code = (
        "import sys\n"
        "from deployments.infer import OnnxModel\n"
        "from deployments.models import EMBEDDED, spec_for\n"
        "from deployments.runtime import RuntimeConfig\n"
        "model = OnnxModel(EMBEDDED['u2netp'], spec_for('u2netp'), RuntimeConfig(), 2)\n"
        "assert model.batchable and model.report.shapes == [2, 1], model.report\n"
        "assert 'onnx' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("path", SHARED_IMAGES, ids=lambda p: p.name)
def test_in_process_pipeline_matches_rembg(
    path: object, u2netp: OnnxModel, reference_outputs: dict[str, bytes]
) -> None:

    assert isinstance(path, Path)
    result = remove(path.read_bytes(), u2netp)
    assert_parity(path.name, result.body, reference_outputs[path.name])
