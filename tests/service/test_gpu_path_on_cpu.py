"""The GPU path's parts that run the embedded model, on the CPU: graph normalisation gives
the same masks; the GPU benchmark's quick CPU run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from conftest import FIXTURES, load_image
from deployments.bench import gpu as gpu_bench
from deployments.infer import OnnxModel
from deployments.models import EMBEDDED, MODEL_TABLE, ModelSpec
from deployments.preprocess import model_input
from deployments.runtime import (
    CPU,
    RuntimeConfig,
)

U2NETP = MODEL_TABLE["u2netp"]


def fixture_inputs(spec: ModelSpec) -> list[npt.NDArray[np.uint8]]:
    return [model_input(load_image(p), spec.size) for p in sorted(FIXTURES.glob("*.jpg"))]


def test_graph_normalised_u2netp_gives_the_same_masks(u2netp: OnnxModel) -> None:
    pre = OnnxModel(
        EMBEDDED["u2netp"],
        U2NETP,
        RuntimeConfig(intra_op_threads=2, preprocess_in_graph=True),
        2,
    )
    assert pre.takes_uint8 and pre.batchable and pre.buckets == [1, 2]
    images = fixture_inputs(U2NETP)[:2]
    for ours, theirs in zip(pre.predict(images), u2netp.predict(images), strict=True):
        assert np.array_equal(ours, theirs)


def test_gpu_bench_quick_cpu_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.json"
    # fp32 differs from pre only in its flags; the rembg-style loop loads the plain file.
    gpu_bench.main(["--quick", "--cpu", "--variants", "pre", "--threads", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["onnxruntime"] == ort.__version__
    assert [v["name"] for v in result["variants"]] == ["pre"]
    for variant in result["variants"]:
        assert variant["error"] is None
        assert variant["provider"] == CPU
        assert set(variant["images_per_s"]) == {"1", "2"}
        assert all(rate > 0 for rate in variant["images_per_s"].values())
        assert variant["batch_gain"] > 0
    assert result["cpu_side_images_per_s"] > 0
    assert set(result["cpu_side_ms_per_image"]) == {
        "decode",
        "resize",
        "normalize",
        "upscale+cutout+png",
    }
    assert result["rembg_loop_images_per_s"] > 0
    assert result["rembg_loop_provider"] == CPU
    # The table comes last, so a run's tail shows it.
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("rembg-style")
