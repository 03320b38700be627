"""Prometheus metrics through ``ray.serve.metrics``, per model.

Ray exports them on each node's metrics endpoint with the prefix ``ray_`` (a
counter named ``rembg_images_total`` is scraped as ``ray_rembg_images_total``),
beside Serve's built-in ``ray_serve_*`` metrics. Created once per replica.
"""

from __future__ import annotations

from contextvars import ContextVar

from ray.serve.metrics import Counter, Gauge, Histogram

# The model the current request was routed to ("-" before routing), so that an
# error answered later, in an exception handler, is tagged with it. Per request
# task; module-level because a ContextVar cannot be pickled with a deployment.
_routed_to: ContextVar[str] = ContextVar("routed_to", default="-")

_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
_BATCH = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
_BYTES = [1e4, 1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7]


class IngressMetrics:
    """What the ingress sees of each request."""

    def __init__(self) -> None:
        tags = ("model",)
        self.images = Counter(
            "rembg_images_total", "Images answered with a cut-out.", tag_keys=tags
        )
        self.errors = Counter(
            "rembg_errors_total",
            "Requests answered with an error, by code.",
            tag_keys=("model", "code"),
        )
        self.pre = Histogram("rembg_preprocess_seconds", "Decode and resize time.", _SECONDS, tags)
        self.post = Histogram(
            "rembg_postprocess_seconds",
            "Mask upscale, compose and encode time.",
            _SECONDS,
            tags,
        )
        self.bytes_in = Histogram("rembg_request_bytes", "Uploaded image bytes.", _BYTES, tags)
        self.bytes_out = Histogram("rembg_response_bytes", "Returned image bytes.", _BYTES, tags)

    def done(self, model: str, pre_s: float, post_s: float, bytes_in: int, bytes_out: int) -> None:
        tags = {"model": model}
        self.images.inc(tags=tags)
        self.pre.observe(pre_s, tags=tags)
        self.post.observe(post_s, tags=tags)
        self.bytes_in.observe(bytes_in, tags=tags)
        self.bytes_out.observe(bytes_out, tags=tags)

    def routed(self, model: str) -> None:
        _routed_to.set(model)

    def failed(self, code: str) -> None:
        self.errors.inc(tags={"model": _routed_to.get(), "code": code})


class ModelMetrics:
    """What a model replica sees of each batch."""

    def __init__(self) -> None:
        tags = ("model",)
        self.batch_size = Histogram(
            "rembg_batch_size", "Images per batched session run.", _BATCH, tags
        )
        self.queue_wait = Histogram(
            "rembg_queue_wait_seconds",
            "From a request reaching the model replica to its batch starting.",
            _SECONDS,
            tags,
        )
        self.inference = Histogram(
            "rembg_inference_seconds",
            "Batch time in ONNX Runtime (with normalise).",
            _SECONDS,
            tags,
        )
        self.reconfigure_failed = Gauge(
            "rembg_model_reconfigure_failed",
            "1 while this replica's last live reconfigure failed: it serves its previous "
            "config, and a replica started now would load the failed one.",
            tags,
        )

    def reconfigured(self, model: str, ok: bool) -> None:
        self.reconfigure_failed.set(0 if ok else 1, tags={"model": model})

    def batch(self, model: str, size: int, waits_s: list[float], inference_s: float) -> None:
        tags = {"model": model}
        self.batch_size.observe(size, tags=tags)
        for wait in waits_s:
            self.queue_wait.observe(wait, tags=tags)
        self.inference.observe(inference_s, tags=tags)


class PoolMetrics:
    """What a pool replica sees of its models: hits, loads, evictions, failures."""

    def __init__(self) -> None:
        tags = ("model",)
        self.events = Counter(
            "rembg_pool_events_total",
            "Pooled model events: hit, miss, load, evict, failure.",
            tag_keys=("model", "event"),
        )
        self.load = Histogram(
            "rembg_pool_load_seconds", "A pooled model's load and warm-up.", _SECONDS, tags
        )
        self.used = Gauge("rembg_pool_used_bytes", "Bytes of the pool budget in use.")

    def event(self, event: str, model: str, seconds: float, used_bytes: int) -> None:
        self.events.inc(tags={"model": model, "event": event})
        if event == "load":
            self.load.observe(seconds, tags={"model": model})
        self.used.set(used_bytes)
