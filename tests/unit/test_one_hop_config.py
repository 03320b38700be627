"""One hop's configuration without Ray: the config transform, the Ingress's
user_config parts, the resources a one-hop ingress replica reserves."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.serve_app import _per_model
from deployments.settings import IngressLiveConfig, ingress_model_parts, one_hop, service_app


def config(*blocks: dict[str, Any], runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    app: dict[str, Any] = {
        "name": "rembg",
        "import_path": "deployments.serve_app:build_app",
        "args": {"models": [{"name": "u2netp"}, {"name": "isnet-general-use"}]},
        "deployments": list(blocks),
    }
    if runtime_env is not None:
        app["runtime_env"] = runtime_env
    return {"applications": [app]}


def test_several_models_move_into_the_ingress_with_the_first_ones_scaling() -> None:
    before = config(
        {"name": "Ingress", "ray_actor_options": {"num_cpus": 0}},
        {
            "name": "Model_u2netp",
            "user_config": {"max_batch_size": 2},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
        },
        {
            "name": "Model_isnet-general-use",
            "user_config": {"max_batch_size": 8, "model_version": "v2"},
            "autoscaling_config": {"min_replicas": 2, "max_replicas": 9},
        },
        {"name": "Pool", "user_config": {"max_batch_size": 4}},
    )
    app = service_app(one_hop(before))
    assert [d["name"] for d in app["deployments"]] == ["Ingress", "Pool"]
    ingress = app["deployments"][0]
    live = IngressLiveConfig.model_validate(ingress["user_config"])
    assert live.models["u2netp"].max_batch_size == 2
    assert live.models["isnet-general-use"].model_version == "v2"
    # The default (first) model's scaling; the Ingress's own resources dropped.
    assert ingress["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    assert "ray_actor_options" not in ingress
    assert app["args"]["models_in_ingress"] is True
    # The input is left as it was.
    assert len(service_app(before)["deployments"]) == 4


def test_no_ingress_block_still_keeps_the_models_live_configs() -> None:
    app = service_app(
        one_hop(config({"name": "Model_u2netp", "user_config": {"model_path": "/m"}}))
    )
    (ingress,) = app["deployments"]
    assert ingress["name"] == "Ingress"
    assert ingress["user_config"] == {"models": {"u2netp": {"model_path": "/m"}}}


def test_the_transform_twice_is_the_transform_once() -> None:
    once = one_hop(config({"name": "Ingress"}, {"name": "Model_u2netp", "user_config": {"a": 1}}))
    assert one_hop(once) == once


def test_the_ingress_environment_moves_to_the_application() -> None:
    ingress = {
        "name": "Ingress",
        "ray_actor_options": {
            "num_cpus": 0,
            "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2", "REMBG_KEY": "k"}},
        },
    }
    app = service_app(one_hop(config(ingress, runtime_env={"env_vars": {"A": "1"}})))
    assert app["runtime_env"] == {"env_vars": {"A": "1", "MALLOC_ARENA_MAX": "2", "REMBG_KEY": "k"}}
    clash = {**ingress, "ray_actor_options": {"runtime_env": {"working_dir": "/b"}}}
    with pytest.raises(ValueError, match="working_dir"):
        one_hop(config(clash, runtime_env={"working_dir": "/a"}))


def test_the_ingress_user_config_parts() -> None:
    served = {"u2netp", "isnet-general-use"}
    parts = ingress_model_parts({"models": {"u2netp": {"max_batch_size": 2, "typo": 1}}}, served)
    # A model's own part is its server's to check (a typo there is that model's error).
    assert parts == {"u2netp": {"max_batch_size": 2, "typo": 1}}
    assert ingress_model_parts({}, served) == {}
    for bad in (
        {"models": {"u2net": {}}},  # not served here
        {"model": {"u2netp": {}}},  # a typo at the top
        {"models": ["u2netp"]},
        {"models": {"u2netp": 4}},
    ):
        with pytest.raises(ValueError):
            ingress_model_parts(bad, served)


def test_a_one_hop_replica_reserves_a_model_replicas_resources_per_model() -> None:
    assert _per_model({"num_cpus": 2}, 1) == {"num_cpus": 2}
    assert _per_model({"num_cpus": 1, "num_gpus": 0.25}, 3) == {"num_cpus": 3, "num_gpus": 0.75}
    with pytest.raises(ValueError, match="more than one GPU"):
        _per_model({"num_cpus": 1, "num_gpus": 0.5}, 3)
