"""The deployment manifests in config/ parse, validate and agree with serve_config.yaml.

No cluster and no Docker engine here: the checks are the schemas that ship with
Ray (Serve's config schema, the cluster launcher's JSON schema), our own
settings models, and consistency between the files.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from conftest import ROOT
from deployments.launch import FAST_PATH, HAPROXY_BINARY
from deployments.settings import AppSettings, IngressLiveConfig, LiveModelConfig, one_hop

CONFIG = ROOT / "config"


def _gpu_config_module() -> ModuleType:
    # config/ is not a package: load its generator by path.
    spec = importlib.util.spec_from_file_location("gpu_config", CONFIG / "gpu_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_config = _gpu_config_module()


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rayservice() -> dict[str, Any]:
    manifest: dict[str, Any] = load(CONFIG / "rayservice.yaml")
    return manifest


def serve_config_v2() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    return config


def test_serve_config_v2_is_serve_config_with_the_gpu_overrides() -> None:
    assert serve_config_v2() == gpu_config.gpu_config()
    # Byte for byte what `python config/gpu_config.py` writes: rerun it after
    # changing serve_config.yaml.
    assert (CONFIG / "rayservice.yaml").read_text() == gpu_config.rayservice_text(
        gpu_config.gpu_config()
    )


def test_gpu_serve_config_file_is_the_rayservice_one() -> None:
    assert load(CONFIG / "serve_config.gpu.yaml") == serve_config_v2()


@pytest.mark.parametrize("name", ["serve_config.yaml", "config/serve_config.gpu.yaml"])
def test_model_deployments_log_as_the_top_level_without_access_lines(name: str) -> None:
    """A deployment's logging_config replaces the top-level one whole (Ray 2.60):
    each model deployment's must be the top level's with Serve's access line off."""
    config = load(ROOT / name)
    top = config["logging_config"]
    models = [d for d in config["applications"][0]["deployments"] if d["name"].startswith("Model_")]
    assert models
    for deployment in models:
        assert deployment["logging_config"] == {**top, "enable_access_log": False}, deployment


def test_overrides_touch_only_what_a_gpu_cluster_changes() -> None:
    base = load(ROOT / "serve_config.yaml")["applications"][0]
    gpu = serve_config_v2()["applications"][0]
    changed = {k for k in base["args"] if base["args"][k] != gpu["args"][k]}
    assert changed == {"device", "num_cpus", "fidelity"}
    assert base["deployments"] != gpu["deployments"]
    assert [d["name"] for d in base["deployments"]] == [d["name"] for d in gpu["deployments"]]


def test_one_hop_config_is_serve_config_with_the_models_in_the_ingress() -> None:
    path = CONFIG / "serve_config.one_hop.yaml"
    base = load(ROOT / "serve_config.yaml")
    # Byte for byte what `python config/gpu_config.py` writes.
    assert path.read_text() == gpu_config.ONE_HOP_HEADER + gpu_config.dump(one_hop(base))
    app, before = load(path)["applications"][0], base["applications"][0]
    assert before["args"]["models_in_ingress"] is False and app["args"]["models_in_ingress"] is True
    assert {**app["args"], "models_in_ingress": False} == before["args"]
    [ingress] = app["deployments"]
    model = next(d for d in before["deployments"] if d["name"] == "Model_u2netp")
    # The replicas now hold the model: its batch knobs, scaling and health checks.
    live = IngressLiveConfig.model_validate(ingress["user_config"])
    assert live.models["u2netp"] == LiveModelConfig.model_validate(model["user_config"])
    assert ingress["autoscaling_config"] == model["autoscaling_config"]
    assert ingress["health_check_timeout_s"] == model["health_check_timeout_s"]
    # No ray_actor_options: a config's would replace the model's resources the code sets.
    assert "ray_actor_options" not in ingress
    ServeDeploySchema.model_validate(load(path))


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(lambda: load(ROOT / "serve_config.yaml"), id="serve_config.yaml"),
        pytest.param(serve_config_v2, id="rayservice serveConfigV2"),
        pytest.param(lambda: load(CONFIG / "serve_config.gpu.yaml"), id="serve_config.gpu"),
    ],
)
def test_serve_configs_pass_ray_and_our_schemas(config: Any) -> None:
    loaded = config()
    schema = ServeDeploySchema.model_validate(loaded)
    assert [app.name for app in schema.applications] == ["rembg"]
    for app in loaded["applications"]:
        settings = AppSettings.model_validate(app["args"])
        names = {d["name"] for d in app["deployments"]}
        # Every deployment configured is one build_app creates, and vice versa.
        assert names == {"Ingress"} | {f"Model_{m.name}" for m in settings.models}
        for deployment in app["deployments"]:
            if "user_config" in deployment:
                LiveModelConfig.model_validate(deployment["user_config"])
            autoscaling = deployment.get("autoscaling_config", {})
            # Never scale to zero: a cold start costs a model load and warm-up.
            assert autoscaling.get("min_replicas", 1) >= 1


def test_gpu_overrides_apply_to_every_model_deployment() -> None:
    for name in ("Model_u2netp", "Model_isnet-general-use", "Model_birefnet-general"):
        assert gpu_config.gpu_override(name) == gpu_config.GPU_MODEL
    assert gpu_config.gpu_override("Ingress") == gpu_config.GPU_INGRESS


def test_gpu_config_batches_fit_in_flight() -> None:
    for deployment in serve_config_v2()["applications"][0]["deployments"]:
        if "user_config" in deployment:
            # A replica must hold at least one full batch at once.
            assert deployment["max_ongoing_requests"] >= deployment["user_config"]["max_batch_size"]


def test_rayservice_cluster_shape() -> None:
    spec = rayservice()["spec"]
    assert rayservice()["apiVersion"] == "ray.io/v1"
    assert rayservice()["kind"] == "RayService"
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert serve_config_v2()["http_options"]["port"] in ports
    [gpu] = cluster["workerGroupSpecs"]
    assert 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    args = serve_config_v2()["applications"][0]["args"]
    # Replicas per card times the cards the group can have covers max_replicas.
    model = serve_config_v2()["applications"][0]["deployments"][1]
    per_node = min(int(1 / args["num_gpus"]), int(limits["cpu"]) // args["num_cpus"])
    assert per_node * gpu["maxReplicas"] >= model["autoscaling_config"]["max_replicas"]


def images() -> set[str]:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    found = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    found.add(load(CONFIG / "cluster.yaml")["docker"]["image"])
    return found


def test_one_image_everywhere_and_the_dockerfile_names_it() -> None:
    [image] = images()
    assert image in (CONFIG / "Dockerfile").read_text()


def test_cluster_launcher_config_passes_rays_schema() -> None:
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = load(CONFIG / "cluster.yaml")
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    gpu = config["available_node_types"]["gpu"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] >= 1
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs with continuations joined, comments dropped."""
    text = (CONFIG / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_copies_paths_that_exist_and_bakes_the_models() -> None:
    steps = dockerfile()
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "EXPOSE", "CMD"}
    assert {i for i, _ in steps} <= known
    copies = [shlex.split(args) for i, args in steps if i == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"
    env = " ".join(args for i, args in steps if i == "ENV")
    assert "REMBG_HOME=" in env
    runs = " ".join(args for i, args in steps if i == "RUN")
    assert "pip install ." in runs
    assert "rembg-serve fetch --config serve_config.yaml" in runs
    # The models are fetched at build time, once the package and config are in.
    install = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "pip install ." in a)
    config = next(n for n, (i, a) in enumerate(steps) if i == "COPY" and "serve_config" in a)
    fetch = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "fetch" in a)
    assert install < fetch and config < fetch
    exposed = {int(p) for i, args in steps if i == "EXPOSE" for p in args.split()}
    assert load(ROOT / "serve_config.yaml")["http_options"]["port"] in exposed


def test_the_image_turns_serves_fast_path_on_for_every_ray_process() -> None:
    """KubeRay and the cluster launcher run `ray start` in this image: its environment is
    what every Ray process of theirs reads, so the fast path is set there, as
    `rembg-serve up` sets it, with the HAProxy wrapper the build writes."""
    steps = dockerfile()
    env = dict(pair.split("=", 1) for i, args in steps if i == "ENV" for pair in shlex.split(args))
    for name, value in FAST_PATH.items():
        assert env.get(name) == value, name
    wrapper = env[HAPROXY_BINARY]
    writes = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "haproxy_wrapper(" in a)
    install = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "pip install ." in a)
    assert install < writes and str(Path(wrapper).parent) in steps[writes][1]
    assert Path(wrapper).name == "haproxy"
    cmd = next(json.loads(a) for i, a in steps if i == "CMD")
    assert cmd[:2] == ["rembg-serve", "up"]


def test_the_image_compiles_matting_at_build_time_for_any_cpu() -> None:
    steps = dockerfile()
    env = " ".join(args for i, args in steps if i == "ENV")
    assert "NUMBA_CPU_NAME=generic" in env
    install = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "pip install ." in a)
    warm = next(n for n, (i, a) in enumerate(steps) if i == "RUN" and "warm_refine()" in a)
    assert install < warm
    # numba keys its cache by (target triple, CPU name, CPU features): with the
    # generic CPU neither the build machine's name nor its features are in it,
    # so what the build compiled loads on a node of any x86-64 kind.
    probe = (
        "from numba.core.registry import cpu_target;"
        "print(repr(cpu_target.target_context.codegen().magic_tuple()))"
    )
    generic = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "NUMBA_CPU_NAME": "generic"},
        capture_output=True,
        text=True,
        check=True,
    )
    host = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    triple, cpu, features = ast.literal_eval(generic.stdout.strip())
    assert (cpu, features) == ("generic", "")
    host_triple, _cpu, host_features = ast.literal_eval(host.stdout.strip())
    assert host_triple == triple and host_features != ""


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignore = (CONFIG / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    copied = {
        source for i, args in dockerfile() if i == "COPY" for source in shlex.split(args)[:-1]
    }
    assert copied <= kept


def test_front_proxies_match_the_service_limits() -> None:
    """config/ingress.yaml (Kubernetes) and config/nginx.conf (a VM) refuse what the
    service would, before Serve's proxy buffers it, and point at the right backend."""
    args = load(ROOT / "serve_config.yaml")["applications"][0]["args"]
    http = load(ROOT / "serve_config.yaml")["http_options"]
    limit_mib = args["limits"]["max_upload_bytes"] // 2**20
    ingress = load(CONFIG / "ingress.yaml")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{limit_mib}m"
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > http["request_timeout_s"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    # KubeRay names a RayService's Serve service <name>-serve-svc.
    assert backend["name"] == rayservice()["metadata"]["name"] + "-serve-svc"
    assert backend["port"]["number"] == http["port"]
    nginx = (CONFIG / "nginx.conf").read_text()
    assert f"client_max_body_size {limit_mib}m;" in nginx
    assert "proxy_request_buffering on;" in nginx
    assert f"server 127.0.0.1:{http['port']};" in nginx
    # Serve's proxy lifts its timeout and its disconnect check for any client
    # sending these: nginx blanks them (an empty value is not forwarded).
    for header in ("X-Request-Timeout-Seconds", "X-Request-Disconnect-Disabled"):
        assert f'proxy_set_header {header} "";' in nginx
