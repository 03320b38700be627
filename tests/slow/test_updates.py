"""Operating the service under load: a model update and a scale-down drop nothing.

Both go the way an operator does them: an edited serve_config.yaml sent again
with `serve deploy` to the running cluster, while clients keep posting images.
Every answer is counted; the target is no answer other than 200.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from ray import serve
from test_scaling import (
    IMAGE,
    MODEL,
    LocalServe,
    edited_config,
    load,
    local_serve,
    replicas,
    wait_for,
)

from conftest import free_port
from deployments.models import EMBEDDED
from deployments.settings import merged, one_hop

pytestmark = pytest.mark.slow


def model_info(cluster: LocalServe) -> dict[str, Any]:
    with cluster.client(timeout=30) as client:
        (info,) = client.get("/models").json()["models"]
    return dict(info)


def started(cluster: LocalServe, port: int, **model: Any) -> LocalServe:
    cluster.url = f"http://127.0.0.1:{port}"
    cluster.deploy(edited_config(port, **model))
    return cluster


def configured(topology: str, port: int, **model: Any) -> dict[str, Any]:
    """``edited_config``; for "one_hop", its one-hop form (config/serve_config.one_hop.yaml's
    transform) with ``model``'s options given to the Ingress, which holds the model."""
    if topology == "split":
        return edited_config(port, **model)
    config = one_hop(edited_config(port))
    app = config["applications"][0]
    edit = {**model, "user_config": {"models": {"u2netp": model.get("user_config", {})}}}
    app["deployments"] = [
        merged(d, edit) if d["name"] == "Ingress" else d for d in app["deployments"]
    ]
    return config


@pytest.mark.parametrize("topology", ["split", "one_hop"])
def test_model_swap_through_config_keeps_every_request(tmp_path: Path, topology: str) -> None:
    # "The new model": a copy of the embedded u2netp under another name, so
    # that /models can tell which file answers.
    new_file = tmp_path / "u2netp-v2.onnx"
    shutil.copy(EMBEDDED["u2netp"], new_file)
    with local_serve(tmp_path, num_cpus=2) as cluster:
        port = free_port()
        # One fixed replica: the update must happen inside it, not by
        # replacing it.
        fixed = {"autoscaling_config": None, "num_replicas": 1}
        cluster.url = f"http://127.0.0.1:{port}"
        cluster.deploy(configured(topology, port, user_config={"max_batch_size": 2}, **fixed))
        before = model_info(cluster)
        assert before["file"] == "u2netp.onnx" and before["model_version"] is None

        with load(cluster.url, clients=4) as running:
            wait_for(lambda: running.statuses()[200] >= 5, 120, "load running")
            before_update = running.statuses()[200]
            # Returns once the app is RUNNING again: reconfigure() has swapped.
            cluster.deploy(
                configured(
                    topology,
                    port,
                    user_config={
                        "max_batch_size": 4,
                        "model_version": "v2",
                        "model_path": str(new_file),
                    },
                    **fixed,
                )
            )
            swap_s = wait_for(
                lambda: model_info(cluster)["model_version"] == "v2",
                300,
                "new model serving",
            )
            at_swap = running.statuses()[200]
            # Requests kept being answered while the new session loaded and warmed.
            assert at_swap > before_update
            wait_for(lambda: running.statuses()[200] >= at_swap + 5, 120, "load after the swap")
            after = model_info(cluster)

            # A bad update: a model file that is not there (a typo). The replica
            # keeps serving v2, says why in /models, and is not replaced.
            cluster.deploy(
                configured(
                    topology,
                    port,
                    user_config={
                        "max_batch_size": 4,
                        "model_version": "v3",
                        "model_path": str(tmp_path / "u2netp-v3-typo.onnx"),
                    },
                    **fixed,
                )
            )
            wait_for(
                lambda: model_info(cluster)["last_reconfigure_error"] is not None,
                120,
                "the failed update reported",
            )
            at_bad = running.statuses()[200]
            wait_for(
                lambda: running.statuses()[200] >= at_bad + 5, 120, "load after the bad update"
            )
        bad = model_info(cluster)
        print(
            f"answers {dict(running.statuses())}; swap seen after {swap_s:.1f}s; bad update: {bad}"
        )
        assert set(running.statuses()) == {200}, f"answers other than 200: {running.statuses()}"
        assert after["file"] == "u2netp-v2.onnx" and after["model_version"] == "v2"
        assert after["max_batch_size"] == 4 and 4 in after["batch_shapes"]
        # reconfigure() swapped the session inside the same replica (same id, same pid).
        assert replicas(MODEL if topology == "split" else "Ingress") == 1
        assert (after["replica"], after["pid"]) == (before["replica"], before["pid"])
        # The bad update left that replica serving v2, with the error's kind shown.
        assert (bad["replica"], bad["pid"], bad["file"]) == (
            after["replica"],
            after["pid"],
            after["file"],
        )
        assert bad["model_version"] == "v2"
        assert bad["last_reconfigure_error"]["error"] == "ModelUnavailable"
        assert bad["last_reconfigure_error"]["model_version"] == "v3"
        if topology == "one_hop":
            _ingress_config_refused(cluster, port, fixed, after)


def _ingress_config_refused(
    cluster: LocalServe, port: int, fixed: dict[str, Any], serving: dict[str, Any]
) -> None:
    """One hop: an Ingress user_config naming a model it does not serve changes
    nothing, and the model says so in /models."""
    config = configured("one_hop", port, user_config={"max_batch_size": 1}, **fixed)
    ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["user_config"]["models"]["u2net"] = {}
    cluster.deploy(config)
    wait_for(
        lambda: model_info(cluster)["last_reconfigure_error"]["error"] == "ValueError",
        120,
        "the refused user_config reported",
    )
    info = model_info(cluster)
    with cluster.client(timeout=60) as client:
        assert client.post("/remove", content=IMAGE).status_code == 200
    # Not applied, not even its valid part: the same session, the batch size as before.
    assert (info["pid"], info["file"], info["model_version"]) == (
        serving["pid"],
        serving["file"],
        serving["model_version"],
    )
    assert info["max_batch_size"] == serving["max_batch_size"] == 4


def test_scale_down_drains_in_flight_requests(tmp_path: Path) -> None:
    with local_serve(tmp_path, num_cpus=3) as cluster:
        port = free_port()
        base = edited_config(port)
        model = next(d for d in base["applications"][0]["deployments"] if d["name"] == MODEL)
        # The drain deadline an operator set in serve_config.yaml.
        grace = model["graceful_shutdown_timeout_s"]
        assert grace >= 10
        fixed = {"autoscaling_config": None, "user_config": {"max_batch_size": 1}}
        started(cluster, port, num_replicas=2, **fixed)
        assert replicas() == 2

        # Eight clients keep both replicas' queues busy, so the one that stops
        # has requests in flight when it is told to go.
        with load(cluster.url, clients=8) as running:
            wait_for(lambda: running.statuses()[200] >= 10, 120, "load running")
            cluster.deploy(edited_config(port, num_replicas=1, **fixed))
            drained_s = wait_for(lambda: states() == {"RUNNING": 1}, grace + 60, "drained")
            at_drain = running.statuses()[200]
            wait_for(lambda: running.statuses()[200] >= at_drain + 5, 120, "load after drain")
        print(f"answers {dict(running.statuses())}; one replica left after {drained_s:.1f}s")
        assert set(running.statuses()) == {200}, f"answers other than 200: {running.statuses()}"


def states() -> dict[str, int]:
    try:
        status = serve.status().applications["rembg"].deployments[MODEL]
    except KeyError:
        return {}
    return {str(k): int(v) for k, v in status.replica_states.items()}
