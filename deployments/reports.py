"""What ``GET /models`` and ``GET /healthz`` answer, as typed records.

One definition for the model replica (which fills ``ModelInfo``), the ingress
(``ModelsReport``), the routes (their ``response_model``, so the OpenAPI document
is derived from these), the client and the CLI. Imports only pydantic.

Keys a state does not have are left out of the JSON, not sent as ``null``: a
replica that is not ready reports no file, and ``stale`` appears only when it is
true. So the wire form is ``model_dump(mode="json", exclude_unset=True)``, and
a field counts as present when it was set, even to ``None``
(``last_reconfigure_error: null`` is an answer: the last reconfigure applied).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


def wire(report: BaseModel) -> dict[str, Any]:
    """``report`` as JSON values, with only the keys it was given."""
    return report.model_dump(mode="json", exclude_unset=True)


class ReconfigureError(BaseModel):
    """A live ``user_config`` the replica could not apply; it serves as before."""

    at: str  # UTC, ISO 8601 to the second
    error: str  # the exception's class name only: /models is public, paths stay in the log
    model_version: str | None


class ModelInfo(BaseModel):
    """What one model replica says of itself (or the ingress of it, when it cannot).

    A ready replica sets every field up to ``last_reconfigure_error``; one still
    loading sets ``name``, ``ready`` and ``replica``; one that did not answer and
    never had, ``name``, ``ready`` and ``reason``.
    """

    name: str
    ready: bool
    replica: str | None = None
    # Why the ingress has no answer at all (the exception's class name).
    reason: str | None = None
    pid: int | None = None
    file: str | None = None
    model_version: str | None = None
    input_size: tuple[int, int] | None = None  # (width, height)
    device: Literal["cpu", "gpu"] | None = None
    provider: str | None = None
    intra_op_threads: int | None = None
    # Whether a batch of n equals n single runs for this graph (else batch 1 only).
    batched: bool | None = None
    batch_shapes: list[int] | None = None
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None
    # Batches this replica formed since it started, by size (JSON keys: strings).
    batch_sizes_formed: dict[str, int] | None = None
    busy: bool | None = None
    load_s: float | None = None
    warmup_s: float | None = None
    last_reconfigure_error: ReconfigureError | None = None
    # The replica was too busy to answer: this is its last answer.
    stale: bool = False


class PooledModelInfo(BaseModel):
    """One pooled model as the pool replica that answered holds it."""

    name: str
    loaded: bool
    # Charged against the budget: declared in the config, else measured at load.
    bytes: int | None = None
    # The replica's growth over its last load and warm-up, in the memory the
    # budget counts (``PoolReplicaInfo.budget_memory``).
    measured_bytes: int | None = None
    # Requests holding it now (a leased model is never evicted).
    leases: int = 0
    loads: int = 0
    hits: int = 0
    evictions: int = 0
    failures: int = 0
    load_s: float | None = None  # its last load and warm-up
    # Its last load failed (the exception's class name); it is retried later.
    error: str | None = None


class PoolReplicaInfo(BaseModel):
    """What one pool replica holds: its models least recently used first."""

    replica: str
    pid: int
    budget_bytes: int
    used_bytes: int
    loaded: list[str]
    models: list[PooledModelInfo]
    # What the budget counts: the replica's host memory (RSS; CPU replicas, or a
    # GPU replica where NVML cannot be read), or its memory on the card.
    budget_memory: Literal["host", "device"] = "host"


class PoolReport(BaseModel):
    """The pooled models; ``replica`` is the answer of one pool replica, or absent
    with ``reason`` when none answered."""

    models: list[str]
    replica: PoolReplicaInfo | None = None
    reason: str | None = None


class RefineState(BaseModel):
    """Whether alpha matting's code is loaded (warm) on the ingress replica that answered."""

    warm: bool
    warming: bool = False
    error: str | None = None  # the warm-up's exception class name
    warm_s: float | None = None


class ModelsReport(BaseModel):
    """``GET /models``: every configured model's ``ModelInfo``, in the configured order."""

    # The model a request that names none gets.
    default: str
    models: list[ModelInfo]
    refine: RefineState
    # Only where the app has a pool of on-demand models.
    pool: PoolReport | None = None


class HealthReport(BaseModel):
    """``GET /healthz``: 200 with ``ok`` while every model can serve, else 503."""

    status: Literal["ok", "unavailable"]
    # Per configured model: does at least one replica run (busy counts as yes);
    # a pooled model: does a pool replica run (it loads the model on demand).
    models: dict[str, bool]

    @property
    def ok(self) -> bool:
        return self.status == "ok"
