"""The application builder named in serve_config.yaml's ``import_path``.

``build_app`` reads the app's ``args``, picks the GPU or the CPU path from the
cluster, and binds one ``ModelServer`` deployment per model (``Model_<name>``)
and, where the args have a ``pool``, one ``PoolServer`` (``Pool``) for all the
pooled models, behind one ``Ingress``.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import ray
from ray import serve

from deployments.ingress import Ingress
from deployments.model_server import ModelServer
from deployments.pool_server import PoolServer
from deployments.runtime import use_gpu_for
from deployments.settings import (
    POOL_DEPLOYMENT,
    AppSettings,
    IngressLiveConfig,
    LiveModelConfig,
    PoolLiveConfig,
    deployment_name,
)

logger = logging.getLogger("ray.serve")


def _cluster_gpus() -> float:
    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def _per_model(actor_options: dict[str, Any], models: int) -> dict[str, Any]:
    """A one-hop ingress replica's resources: a model replica's, ``models`` times."""
    options = {"num_cpus": actor_options["num_cpus"] * models}
    if "num_gpus" in actor_options:
        options["num_gpus"] = actor_options["num_gpus"] * models
        if options["num_gpus"] > 1:
            raise ValueError(
                f"models_in_ingress: {models} models x num_gpus {actor_options['num_gpus']} "
                "is more than one GPU per replica; lower num_gpus or give each model its "
                "own deployment"
            )
    return options


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder for serve_config.yaml's ``import_path``."""
    settings = AppSettings.model_validate(args)
    gpu = use_gpu_for(settings.device, _cluster_gpus())
    actor_options: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if gpu:
        actor_options["num_gpus"] = settings.num_gpus
    # @serve.deployment turned the classes into Deployment objects; mypy sees classes.
    model_server, ingress = cast(serve.Deployment, ModelServer), cast(serve.Deployment, Ingress)
    handles = {}
    num_gpus = settings.num_gpus if gpu else 0.0
    if settings.models_in_ingress:
        # One hop: each ingress replica holds every model, so it takes a model
        # replica's resources once per model; batch knobs and model files in its
        # user_config.
        ingress = ingress.options(
            ray_actor_options=_per_model(actor_options, len(settings.models)),
            user_config=IngressLiveConfig().model_dump(mode="json"),
        )
    for model in [] if settings.models_in_ingress else settings.models:
        deployment = model_server.options(
            name=deployment_name(model.name),
            ray_actor_options=actor_options,
            # serve_config.yaml's user_config for this deployment replaces this.
            user_config=LiveModelConfig().model_dump(mode="json"),
        )
        handles[model.name] = deployment.bind(model.model_dump(mode="json"), num_gpus)
    pool = None
    if settings.pool is not None:
        pool = (
            cast(serve.Deployment, PoolServer)
            .options(
                name=POOL_DEPLOYMENT,
                ray_actor_options=actor_options,
                user_config=PoolLiveConfig().model_dump(mode="json"),
            )
            .bind(settings.pool.model_dump(mode="json"), num_gpus)
        )
    logger.info(
        "building app: device %s, models %s%s, pooled %s",
        "gpu" if gpu else "cpu",
        [m.name for m in settings.models],
        " (in the ingress)" if settings.models_in_ingress else "",
        settings.pooled_names,
    )
    app: serve.Application = ingress.bind(settings.model_dump(mode="json"), handles, pool, num_gpus)
    return app
