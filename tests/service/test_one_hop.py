"""One hop (config/serve_config.one_hop.yaml): the model's session inside the ingress
replicas, no model deployment. Started as the README starts the service
(`rembg-serve up CONFIG`, Serve's fast path on), it gives rembg's pixels, says
where the model runs, and batches concurrent requests there."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (
    FIXTURES,
    ROOT,
    SHARED_IMAGES,
    Service,
    assert_parity,
    free_port,
    serve_config,
    start_test_service,
)
from deployments.bench.harness import post_rembg, serve_replicas, stop_process

CAR = FIXTURES / "car-1.jpg"


@pytest.fixture(scope="module")
def one_hop_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    config = serve_config(
        free_port(),
        source=ROOT / "config" / "serve_config.one_hop.yaml",
        args={"refine_warmup": "off"},
    )
    running = start_test_service(tmp_path_factory.mktemp("one-hop"), config)
    try:
        yield running
    finally:
        stop_process(running.process)


@pytest.mark.parametrize("path", SHARED_IMAGES, ids=lambda p: p.name)
def test_one_hop_matches_rembg(
    one_hop_service: Service, path: Path, reference_outputs: dict[str, bytes]
) -> None:
    with one_hop_service.client() as client:
        response = post_rembg(client, path.name, path.read_bytes())
    assert response.status_code == 200, response.text
    assert_parity(path.name, response.content, reference_outputs[path.name])


def test_the_model_runs_in_the_ingress_with_the_model_replicas_resources(
    one_hop_service: Service,
) -> None:
    with one_hop_service.client() as client:
        assert client.get("/healthz").json() == {"status": "ok", "models": {"u2netp": True}}
        (info,) = client.get("/models").json()["models"]
    replicas = serve_replicas(one_hop_service.process.pid)
    # No model deployment: the session lives in an ingress replica's process.
    assert set(replicas.values()) == {"Ingress"}, replicas
    assert replicas[info["pid"]] == "Ingress"
    assert info["ready"] and info["provider"] == "CPUExecutionProvider"
    # The app's num_cpus (2) reached the ingress replica, and ORT's threads with it.
    assert info["intra_op_threads"] == 2
    assert info["batch_shapes"] == [1, 2, 4] and info["max_batch_size"] == 4


def test_concurrent_requests_batch_in_the_ingress(one_hop_service: Service) -> None:
    data = CAR.read_bytes()

    def post(_: int) -> int:
        with one_hop_service.client() as client:
            return client.post("/remove", content=data).status_code

    with one_hop_service.client() as client:
        before = client.get("/models").json()["models"][0]["batch_sizes_formed"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(post, range(16))) == [200] * 16
    with one_hop_service.client() as client:
        after = client.get("/models").json()["models"][0]["batch_sizes_formed"]
    formed = {int(k): v - before.get(k, 0) for k, v in after.items()}
    assert sum(size * n for size, n in formed.items()) == 16
    assert max(size for size, n in formed.items() if n) > 1, formed
