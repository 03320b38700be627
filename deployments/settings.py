"""The service's settings: one validated model, fed from serve_config.yaml.

``AppSettings`` is the application's ``args`` block; ``LiveModelConfig`` is a model
deployment's ``user_config`` (applied live by ``reconfigure``). Unknown keys are
rejected so that a typo in the config fails at start, not silently. A Serve config
file is read here and nowhere else (``load_serve_config``,
``AppSettings.from_serve_config``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.compose import RefineLimits
from deployments.decode import Limits
from deployments.models import MODEL_TABLE
from deployments.options import Fidelity

# Each served model is one Serve deployment, named after it.
MODEL_DEPLOYMENT_PREFIX = "Model_"
# The one deployment that serves every pooled model (``AppSettings.pool``).
POOL_DEPLOYMENT = "Pool"


def deployment_name(model: str) -> str:
    """The Serve deployment that serves ``model`` (its block in serve_config.yaml)."""
    return MODEL_DEPLOYMENT_PREFIX + model


def load_serve_config(path: Path) -> dict[str, Any]:
    """A Serve config file (serve_config.yaml's format), as YAML reads it."""
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a Serve config (a mapping at the top)")
    return config


def service_app(config: Mapping[str, Any]) -> dict[str, Any]:
    """This service's application in a Serve config: the one whose
    ``import_path`` is in ``deployments``."""
    for app in config.get("applications") or []:
        if str(app.get("import_path", "")).startswith("deployments."):
            found: dict[str, Any] = app
            return found
    raise ValueError("the config has no application of this service (import_path deployments.*)")


def merged(base: Mapping[str, Any], edit: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``edit`` merged in, nested dicts key by key; a None value removes."""
    out = copy.deepcopy(dict(base))
    for key, value in edit.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """One served model: a name from the model table, optionally a file path."""

    name: str
    path: Path | None = None
    # Opt-in GPU-path variants (deployments.graph). fp16: float16 weights and
    # arithmetic, float32 IO, GPU replicas only; masks drift by a few grey levels
    # at edges, so it is not rembg-exact. preprocess_in_graph: rembg's
    # normalisation as graph nodes, bit-exact; the replica feeds uint8.
    fp16: bool = False
    preprocess_in_graph: bool = False

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in MODEL_TABLE:
            raise ValueError(f"unknown model {name!r}; supported: {', '.join(sorted(MODEL_TABLE))}")
        return name


class PooledModel(_Strict):
    """A model served on demand from the pool: the name requests give, the
    table entry whose constants it uses (default: the same name), and its file
    (default: rembg's store)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: str | None = None
    path: Path | None = None
    # Its memory when loaded and warm, charged against the budget; None: what
    # its load measured (the replica's growth over load and warm-up: in host
    # memory (RSS) on a CPU replica, on the card on a GPU replica).
    bytes: int | None = Field(default=None, gt=0)

    @property
    def spec_name(self) -> str:
        return self.model or self.name

    @model_validator(mode="after")
    def _known(self) -> PooledModel:
        if self.spec_name not in MODEL_TABLE:
            raise ValueError(
                f"model {self.name!r}: {self.spec_name!r} is not in the model table "
                f"(set `model` to one of: {', '.join(sorted(MODEL_TABLE))})"
            )
        return self


class PoolConfig(_Strict):
    """Models loaded on demand by one multiplexed deployment, under a memory budget
    per replica: least recently used ones are evicted to make room (README
    "Dedicated or pooled models")."""

    models: list[PooledModel] = Field(min_length=1, max_length=64)
    # Memory per pool replica for loaded models, in bytes of its host memory
    # (RSS; a u2net-size model warm at batch 4 on the CPU: ~1.1 GB).
    budget_bytes: int = Field(gt=0)
    # On a GPU replica the budget counts its memory on the card instead (read
    # with NVML; where NVML cannot read it, host memory against budget_bytes):
    # this many bytes per pool replica; None: the replica's CUDA arena limit (its
    # `num_gpus` fraction of the card, less headroom), or `budget_bytes` where
    # the card's memory cannot be read. Each pooled session's arena is capped at
    # it (and at the replica's fraction).
    gpu_budget_bytes: int | None = Field(default=None, gt=0)
    # A model that failed to load fails its requests (503) this long before the
    # next try.
    retry_failed_s: float = Field(default=30.0, ge=0)


class PoolLiveConfig(_Strict):
    """The pool deployment's ``user_config``: batch knobs, applied live."""

    max_batch_size: int = Field(default=4, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=10)


class AppSettings(_Strict):
    """The application's ``args`` in serve_config.yaml."""

    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name="u2netp")], min_length=1
    )
    # Model used when a request names none (rembg's server defaults to
    # bria-rmbg; this service defaults to its first configured model).
    default_model: str | None = None
    # Optional: models served on demand from one multiplexed deployment.
    pool: PoolConfig | None = None
    device: Literal["auto", "gpu", "cpu"] = "auto"
    # GPU fraction per model replica where the device is a GPU.
    num_gpus: float = Field(default=0.25, gt=0, le=1)
    # CPUs per model replica; ONNX Runtime's thread count follows it.
    num_cpus: float = Field(default=1, gt=0)
    # One hop: each model's session runs inside every ingress replica (with
    # num_cpus and num_gpus above), batched there, instead of in a deployment of
    # its own behind a handle call. Batch knobs and model files then live in the
    # Ingress's user_config ({models: {<name>: <a model's user_config>}}).
    models_in_ingress: bool = False
    # Threads in the ingress's pool for decode/resize/compose/encode; None means
    # the cores of the node it runs on.
    ingress_threads: int | None = Field(default=None, gt=0)
    limits: Limits = Field(default_factory=Limits)
    # Decoded pixels one ingress replica holds at once (a request holds its
    # image's from decode to encode; others wait for room before decoding).
    pixel_budget: int = Field(default=100_000_000, gt=0)
    # A request is admitted only while the measured rate says it can finish
    # within this many seconds; otherwise 503 at once, with Retry-After. Keep it
    # well under http_options.request_timeout_s (after which Serve answers 408).
    deadline_s: float = Field(default=30.0, gt=0)
    # A request body not received whole within this many seconds gets a 408
    # (a client that trickles its body is dropped; it holds no admission place
    # meanwhile, as requests are admitted once their body is read). Serve's
    # proxy streams bodies to the replica as they arrive.
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    # A request's work (after its body is read) not done within this many seconds
    # is stopped with a 408, and a client that leaves has its work stopped: the
    # app's own bounds, since Serve's proxy lifts its request_timeout_s and its
    # disconnect check for any client sending x-request-timeout-seconds: 0 or
    # x-request-disconnect-disabled: ?1. Keep it over deadline_s.
    work_timeout_s: float = Field(default=60.0, gt=0)
    # Alpha matting and decontamination: the pixels they work on at most (above,
    # on a downscaled copy), and how many run at once, each on a thread of its
    # own so that they never hold up other requests' decode and encode.
    refine: RefineLimits = Field(default_factory=RefineLimits)
    refine_concurrency: int = Field(default=1, ge=1, le=16)
    # When the refiners (rembg.bg: pymatting, scipy, numba) are loaded and run
    # once: "background" after the replica is ready (compiled in a child process
    # at nice 19, then loaded once the replica is idle a moment; a matting request
    # meanwhile waits for it), "startup" before it is ready, "off" in the first
    # request that needs them. ~170 MiB per ingress replica; a fresh environment
    # compiles pymatting's numba code first (about a minute on 2 cores).
    refine_warmup: Literal["background", "startup", "off"] = "background"
    png_compress_level: int = Field(default=1, ge=0, le=9)
    # exact: rembg's pixels; fast: the mask upscaled at less cost, the same colours
    # (README "Fast cut-outs"). /remove's `fidelity` overrides it per request.
    fidelity: Fidelity = "exact"
    # Optional API key: when set, every route but /healthz and / needs it in
    # `X-API-Key` or `Authorization: Bearer ...`. Prefer `api_key_env`, which names an
    # environment variable of the replicas, to a key written in the config.
    api_key: str | None = Field(default=None, min_length=16)
    api_key_env: str | None = None
    # Browser origins allowed to call the API (CORS); empty keeps CORS off.
    cors_origins: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _default_is_configured(self) -> AppSettings:
        names = [m.name for m in self.models] + self.pooled_names
        if len(set(names)) != len(names):
            raise ValueError(f"a model is listed twice (dedicated or pooled): {names}")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not among models {names}")
        if self.pixel_budget < self.limits.max_pixels:
            raise ValueError("pixel_budget must hold at least one image of limits.max_pixels")
        return self

    @classmethod
    def from_serve_config(cls, path: Path) -> AppSettings:
        """The settings this service's application (its ``args``) has in a Serve
        config file; ValueError (pydantic's ValidationError is one) if invalid."""
        try:
            app = service_app(load_serve_config(path))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        return cls.model_validate(app.get("args") or {})

    @property
    def pooled_names(self) -> list[str]:
        return [m.name for m in self.pool.models] if self.pool else []

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.models[0].name


class LiveModelConfig(_Strict):
    """A model deployment's ``user_config``: changes apply live, in the running replicas.

    The batch knobs' defaults here are the one source for the code (the
    ``@serve.batch`` decorator, ``build_app``, the benchmark); serve_config.yaml
    states its own values and config/gpu_config.py the GPU ones. Changing
    ``model_path`` or ``model_version`` loads and warms a new session beside the
    serving one, then swaps them: no request is dropped.
    """

    # On a CPU batching buys little (compute-bound) and each shape costs warm-up.
    max_batch_size: int = Field(default=4, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=10)
    model_path: Path | None = None
    model_version: str | None = None


class IngressLiveConfig(_Strict):
    """The Ingress's ``user_config`` where the models run in it
    (``AppSettings.models_in_ingress``): each model's live config by name."""

    models: dict[str, LiveModelConfig] = Field(default_factory=dict)


def ingress_model_parts(user_config: Mapping[str, Any], served: set[str]) -> dict[str, Any]:
    """Each model's part of a one-hop Ingress's ``user_config``, unchecked (its model's
    server checks it, as a model replica checks its own); ValueError if the whole
    has another shape than ``IngressLiveConfig``'s or names a model not in ``served``."""
    models = user_config.get("models", {})
    if set(user_config) - {"models"} or not isinstance(models, Mapping):
        raise ValueError("the Ingress's user_config is {models: {<name>: <a model's user_config>}}")
    if not all(isinstance(part, Mapping) for part in models.values()):
        raise ValueError("each model's part of the Ingress's user_config is a mapping")
    unknown = sorted(set(models) - served)
    if unknown:
        raise ValueError(f"the Ingress's user_config names models not served here: {unknown}")
    return dict(models)


# What a one-hop Ingress takes from the model's deployment block: its replicas
# now hold the model, so they scale, stop and are health-checked as it was.
_FROM_MODEL_BLOCK = (
    "autoscaling_config",
    "graceful_shutdown_timeout_s",
    "health_check_period_s",
    "health_check_timeout_s",
)


def one_hop(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (serve_config.yaml's format) with the models run inside the ingress
    replicas (``AppSettings.models_in_ingress``); a config already so is unchanged.

    Each ``Model_<name>`` block goes: its ``user_config`` moves into the Ingress's
    (``IngressLiveConfig``) and the Ingress takes the first one's (the default
    model's) autoscaling, shutdown and health-check options. The Ingress's
    ``ray_actor_options`` go too, as a config's replace the code's whole and the code
    gives a one-hop Ingress the models' resources (the app args ``num_cpus`` and, on
    a GPU, ``num_gpus``, per model); their ``runtime_env`` (environment variables, an
    API key's) moves to the application's, which Serve hands to every deployment.
    """
    out = copy.deepcopy(dict(config))
    app = service_app(out)
    app["args"] = merged(app.get("args") or {}, {"models_in_ingress": True})
    blocks = list(app.get("deployments") or [])
    if not any(b["name"] == "Ingress" for b in blocks):
        blocks.insert(0, {"name": "Ingress"})
    models = {
        d["name"][len(MODEL_DEPLOYMENT_PREFIX) :]: d
        for d in blocks
        if d["name"].startswith(MODEL_DEPLOYMENT_PREFIX)
    }
    first: dict[str, Any] = next(iter(models.values()), {})
    kept = []
    for block in blocks:
        if block["name"].startswith(MODEL_DEPLOYMENT_PREFIX):
            continue
        if block["name"] == "Ingress":
            actor = block.pop("ray_actor_options", None) or {}
            if actor.get("runtime_env"):
                app["runtime_env"] = _app_env(app.get("runtime_env") or {}, actor["runtime_env"])
            block.update({k: first[k] for k in _FROM_MODEL_BLOCK if k in first})
            live = (block.get("user_config") or {}).get("models", {})
            live |= {m: d["user_config"] for m, d in models.items() if "user_config" in d}
            block["user_config"] = {"models": live}
        kept.append(block)
    app["deployments"] = kept
    return out


def _app_env(app_env: Mapping[str, Any], ingress_env: Mapping[str, Any]) -> dict[str, Any]:
    """The application's runtime_env with the Ingress's merged in: environment
    variables key by key (the Ingress's win); any other field must not differ."""
    out = dict(app_env)
    for key, value in ingress_env.items():
        if key == "env_vars":
            out["env_vars"] = {**(out.get("env_vars") or {}), **value}
        elif key in out and out[key] != value:
            raise ValueError(f"the Ingress's runtime_env.{key} differs from the application's")
        else:
            out[key] = value
    return out
