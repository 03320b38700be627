"""The deployments through real Ray Serve, in process, with the embedded model on CPU."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
from ray import serve

from conftest import FIXTURES, free_port
from deployments.decode import Limits
from deployments.infer import OnnxModel
from deployments.ingress import node_cpus
from deployments.pipeline import prepare
from deployments.preprocess import unpack_mask
from deployments.serve_app import build_app
from deployments.settings import AppSettings

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, address="local")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handle = serve.run(build_app({"num_cpus": 1}), name="rembg", route_prefix="/")
        yield handle
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_ingress_pool_follows_the_cpus_ray_counts_on_its_node(app: Any) -> None:
    """2 here, as ray.init said: not os.cpu_count(), the host's cores, which a
    container's CPU limit does not change."""
    assert ray.get(ray.remote(num_cpus=0)(node_cpus).remote()) == 2


def model_handle() -> Any:
    return serve.get_deployment_handle("Model_u2netp", app_name="rembg")


def test_model_replica_equals_in_process_model(app: Any, u2netp: OnnxModel) -> None:
    prepared = prepare((FIXTURES / "car-1.jpg").read_bytes(), u2netp.spec, Limits())
    served = model_handle().predict.remote(prepared.model_input).result()
    assert np.array_equal(served, u2netp.predict([prepared.model_input])[0])


def test_packed_mask_over_the_handle_is_the_mask(app: Any, u2netp: OnnxModel) -> None:
    """What the ingress calls: the same mask, deflated small enough to ride inline."""
    prepared = prepare((FIXTURES / "car-1.jpg").read_bytes(), u2netp.spec, Limits())
    packed = model_handle().predict_packed.remote(prepared.model_input).result()
    assert isinstance(packed, bytes) and len(packed) < 100 * 1024
    mask = unpack_mask(packed, prepared.model_input.shape[:2])
    assert np.array_equal(mask, u2netp.predict([prepared.model_input])[0])


def test_concurrent_requests_form_batches(app: Any) -> None:
    handle = model_handle()
    before = handle.info.remote().result()["batch_sizes_formed"]
    image = np.zeros((320, 320, 3), dtype=np.uint8)
    responses = [handle.predict.remote(image) for _ in range(8)]
    assert all(r.result().shape == (320, 320) for r in responses)
    after = handle.info.remote().result()["batch_sizes_formed"]
    formed = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert sum(int(k) * v for k, v in formed.items()) == 8
    assert max(int(k) for k in formed) > 1, f"no batch larger than 1 formed: {formed}"


def test_reconfigure_applies_live_and_warms_new_shapes(app: Any) -> None:
    # Only user_config differs from the running app: a live reconfigure, no restart.
    serve.run(_with_user_config(max_batch_size=2), name="rembg", route_prefix="/")
    info = model_handle().info.remote().result()
    assert info["max_batch_size"] == 2 and info["batch_shapes"] == [1, 2]
    serve.run(_with_user_config(max_batch_size=8), name="rembg", route_prefix="/")
    info = model_handle().info.remote().result()
    assert info["max_batch_size"] == 8 and info["batch_shapes"] == [1, 2, 4, 8]


def _with_user_config(**user_config: Any) -> Any:
    from deployments.ingress import Ingress
    from deployments.model_server import ModelServer
    from deployments.settings import LiveModelConfig, ModelConfig

    settings = AppSettings(num_cpus=1)
    model = ModelServer.options(
        name="Model_u2netp",
        ray_actor_options={"num_cpus": 1},
        user_config=LiveModelConfig(**user_config).model_dump(mode="json"),
    ).bind(ModelConfig(name="u2netp").model_dump(mode="json"), 0.0)
    return Ingress.bind(settings.model_dump(mode="json"), {"u2netp": model})


def test_serve_counts_the_replica_healthy_by_its_health_check(app: Any) -> None:
    """The check Serve runs passes on a working session, and Serve's controller, which
    runs it every few seconds, counts the one replica healthy and running. (A broken
    session failing the check: tests/service/test_model_server.py.)"""
    model_handle().check_health.remote().result()  # raises if the check fails
    status = serve.status().applications["rembg"].deployments["Model_u2netp"]
    assert (status.status, status.replica_states) == ("HEALTHY", {"RUNNING": 1}), status
