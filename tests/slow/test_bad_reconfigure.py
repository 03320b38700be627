"""A failed live reconfigure, then the serving replica dies: the operator sees
why, and deploying a fixed config brings the model back.

Serve keeps the failed ``user_config`` (the replica that failed it kept its old
session and stayed healthy), so a replacement loads it and fails its start.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from ray import serve
from test_scaling import APP, IMAGE, MODEL, edited_config, local_serve, wait_for
from test_updates import model_info, started

from conftest import free_port
from deployments.models import EMBEDDED

pytestmark = pytest.mark.slow

FIXED = {"autoscaling_config": None, "num_replicas": 1}


def message() -> str:
    return str(serve.status().applications[APP].deployments[MODEL].message)


def test_bad_reconfigure_then_replica_loss_is_visible_and_recoverable(tmp_path: Path) -> None:
    typo = tmp_path / "u2netp-v2-typo.onnx"
    with local_serve(tmp_path, num_cpus=2) as cluster:
        port = free_port()
        started(cluster, port, user_config={"max_batch_size": 1}, **FIXED)
        bad = {"max_batch_size": 1, "model_version": "v2", "model_path": str(typo)}
        cluster.deploy(edited_config(port, user_config=bad, **FIXED))
        wait_for(lambda: model_info(cluster)["last_reconfigure_error"] is not None, 120, "seen")
        info = model_info(cluster)
        with cluster.client(timeout=60) as client:
            # Still serving the old session, and saying the update failed.
            assert client.get("/healthz").status_code == 200
            assert client.post("/remove", content=IMAGE).status_code == 200
        assert info["last_reconfigure_error"]["error"] == "ModelUnavailable"

        os.kill(info["pid"], signal.SIGKILL)
        # The replacement loads the failed config and cannot start: Serve says why.
        wait_for(lambda: "ModelUnavailable" in message(), 180, "the failed start in status")
        with cluster.client(timeout=60) as client:
            wait_for(lambda: client.get("/healthz").status_code == 503, 60, "healthz 503")

        # Recovery: the file put in place and a config Serve sees as changed.
        shutil.copy(EMBEDDED["u2netp"], typo)
        fixed = {**bad, "model_version": "v3"}
        cluster.deploy(edited_config(port, user_config=fixed, **FIXED))
        recovered = model_info(cluster)
        with cluster.client(timeout=60) as client:
            assert client.get("/healthz").status_code == 200
            assert client.post("/remove", content=IMAGE).status_code == 200
        assert recovered["model_version"] == "v3" and recovered["file"] == typo.name
        assert "last_reconfigure_error" not in recovered or not recovered["last_reconfigure_error"]
