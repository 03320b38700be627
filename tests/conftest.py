"""Shared fixtures: images, the embedded model, rembg's reference, a running service.

Ray tests start a small local Ray (num_cpus set, its own ports) and always shut
it down; the service tests start `serve run` on a copy of serve_config.yaml whose
only change is a free port.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from deployments.bench import start_process, stop_process
from deployments.infer import OnnxModel, RuntimeConfig
from deployments.models import EMBEDDED, resolve_model_file, spec_for

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
SHARED_IMAGES = sorted(FIXTURES.glob("*-1.jpg"))
OUTPUT = ROOT / "test-output"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_bytes(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def gradient(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    """A small synthetic image with structure (not flat), in any mode."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1
    ).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(rgb)


@pytest.fixture(scope="session")
def rembg_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rembg model store holding the embedded u2netp, for rembg's reference runs."""
    home = tmp_path_factory.mktemp("rembg-home")
    (home / "models" / "u2netp").mkdir(parents=True)
    shutil.copy(EMBEDDED["u2netp"], home / "models" / "u2netp" / "u2netp.onnx")
    return home


@pytest.fixture(scope="session")
def reference_outputs(rembg_home: Path) -> dict[str, bytes]:
    """rembg.remove(data, session=new_session("u2netp")) on every shared image."""
    old = os.environ.get("REMBG_HOME")
    os.environ["REMBG_HOME"] = str(rembg_home)
    try:
        from rembg import new_session, remove

        session = new_session("u2netp", providers=["CPUExecutionProvider"])
        return {p.name: bytes(remove(p.read_bytes(), session=session)) for p in SHARED_IMAGES}
    finally:
        if old is None:
            os.environ.pop("REMBG_HOME", None)
        else:
            os.environ["REMBG_HOME"] = old


@pytest.fixture(scope="session")
def u2netp() -> OnnxModel:
    return OnnxModel(
        resolve_model_file("u2netp"), spec_for("u2netp"), RuntimeConfig(intra_op_threads=2), 4
    )


def assert_parity(name: str, ours: bytes, reference: bytes) -> None:
    """Same perceptual hash and alpha within ±2 grey levels; saves both on failure."""
    import imagehash

    got, want = Image.open(io.BytesIO(ours)), Image.open(io.BytesIO(reference))
    same_hash = imagehash.phash(got) == imagehash.phash(want)
    alpha_diff = (
        int(
            np.abs(
                np.asarray(got.getchannel("A"), dtype=np.int16)
                - np.asarray(want.getchannel("A"), dtype=np.int16)
            ).max()
        )
        if got.size == want.size and got.mode == want.mode == "RGBA"
        else 999
    )
    if not (same_hash and alpha_diff <= 2):
        OUTPUT.mkdir(exist_ok=True)
        (OUTPUT / f"parity-ours-{name}.png").write_bytes(ours)
        (OUTPUT / f"parity-rembg-{name}.png").write_bytes(reference)
    assert same_hash, f"{name}: perceptual hash differs from rembg's (saved in test-output/)"
    assert alpha_diff <= 2, f"{name}: alpha differs from rembg's by {alpha_diff} grey levels"


@dataclass
class Service:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    ready_s: float

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


def write_config(tmp: Path, port: int, edit: dict[str, object] | None = None) -> Path:
    """serve_config.yaml with only the HTTP port changed (and optional app args)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    if edit:
        config["applications"][0]["args"].update(edit)
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_service(config: Path, log: Path, timeout_s: float = 180) -> Service:
    """`serve run CONFIG` in its own process group and its own local Ray; ready on /healthz."""
    port = yaml.safe_load(config.read_text())["http_options"]["port"]
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [str(Path(sys.executable).parent / "serve"), "run", str(config)]
    running = start_process(argv, env, log, f"http://127.0.0.1:{port}", "/healthz", timeout_s)
    return Service(running.url, running.process, log, running.ready_s)


def stop_service(process: subprocess.Popen[bytes]) -> None:
    """SIGINT lets `serve run` shut Serve and its local Ray down; then make sure."""
    stop_process(process)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("service")
    running = start_service(write_config(tmp, free_port()), tmp / "serve.log")
    try:
        yield running
    finally:
        stop_service(running.process)
