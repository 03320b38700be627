"""Model files: a missing, corrupt or garbage file is refused at start with a clear message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deployments.errors import ModelUnavailable
from deployments.infer import OnnxModel
from deployments.models import resolve_model_file, spec_for
from deployments.runtime import RuntimeConfig


def test_missing_model_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelUnavailable, match=r"not found; tried: .*nope\.onnx"):
        resolve_model_file("u2netp", missing)


def test_corrupt_store_file_fails_its_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncated download in rembg's store is refused, not loaded."""
    monkeypatch.delenv("U2NET_HOME", raising=False)
    monkeypatch.setenv("REMBG_HOME", str(tmp_path))
    store = tmp_path / "models" / "u2net"
    store.mkdir(parents=True)
    (store / "u2net.onnx").write_bytes(b"\x08\x07" + b"\0" * 1000)
    with pytest.raises(ModelUnavailable, match=r"md5 .* expected .* corrupt or not this model"):
        resolve_model_file("u2net")


def test_garbage_model_given_by_path_fails_to_load(tmp_path: Path) -> None:
    garbage = tmp_path / "u2netp.onnx"
    garbage.write_bytes(b"this is not an onnx model" * 100)
    path = resolve_model_file("u2netp", garbage)  # explicit paths skip the checksum
    with pytest.raises(ModelUnavailable, match=r"could not be loaded from .*u2netp\.onnx"):
        OnnxModel(path, spec_for("u2netp"), RuntimeConfig())


def test_missing_model_names_model_and_paths(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("REMBG_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailable, match=r"'u2net' not found; tried: .*u2net\.onnx"):
        resolve_model_file("u2net")
    with pytest.raises(ModelUnavailable, match=r"no-such\.onnx"):
        resolve_model_file("u2net", tmp_path / "no-such.onnx")
