"""Ray Serve's fast path against its default, side by side in one run.

``rembg-serve up`` starts `serve run` with Serve's fast path on (deployments/launch.py's
``FAST_PATH``: HAProxy in front of the ingress replicas instead of Serve's Python
proxy, the throughput-optimized mode); ``RAY_SERVE_ENABLE_HA_PROXY=0`` and
``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` in its environment give Serve's defaults. Each
mode is measured through the same harness, in the same run:

1. with a stand-in model (``stages.standin_model``: u2netp's shapes, no work), the
   CPU each process group of the service spends per request (Linux /proc): Serve's
   proxy (with HAProxy, its manager actor and the ``haproxy`` processes), the
   ingress replicas, the model replicas and the rest of the session (`serve run`,
   Ray's controller, GCS, raylet, dashboard), for a 64x64 JPEG (the fixed cost of a
   request) and a 1-megapixel JPEG -> PNG, uploads from two closed-loop clients
   after an unmeasured warm-up. The yardstick D is Pillow's decode of that 1 MP
   JPEG in this process (``Image.open`` + ``load``, CPU time, median of 20),
   taken before the first service and again in every mode's service before and
   after its loads (the machine's speed drifts and a busy sibling core slows it):
   D is the median of those samples. Taken beside it each time: each upload's
   whole pipeline in this process with the same stand-in model, so that a
   request's served CPU minus it is the service's own plumbing; and, on the fast
   path, the 64x64 upload's CPU through a Serve app that does no work
   (``echo_app``): the floor of Serve's own request path;
2. with u2netp, the stock serve_config.yaml: a closed loop of 16 clients over the
   shared photos for a fixed time (images/s, latency p50 and p99 of the 200s), the
   modes' services started in turn A B B A (A B in a quick run), each after a short
   unmeasured load; then, in the first service of each mode, 160 clients arriving
   at once, each with one upload of car-1.jpg: the statuses they get and how long
   the refused ones waited for their 503.

A third mode, ``one-hop``, is the fast path with the models inside the ingress
replicas (``deployments.settings.one_hop``: config/serve_config.one_hop.yaml's
transform): the same figures without the ingress -> model handle call (its
``model`` group is then empty: the model's CPU is in the ingress's).
"""

from __future__ import annotations

import io
import ssl
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
from PIL import Image

from deployments.bench.harness import (
    SERVE_CONFIG,
    Json,
    Running,
    free_port,
    percentiles,
    proxies,
    run_load,
    running_service,
    serve_config,
    serve_replicas,
    session_processes,
)
from deployments.bench.stages import (
    _pillow_decode,
    _process_cpu,
    cpu_ms,
    make_input,
    standin_model,
)
from deployments.infer import OnnxModel
from deployments.launch import FAST_PATH
from deployments.models import spec_for
from deployments.pipeline import remove
from deployments.runtime import RuntimeConfig
from deployments.settings import load_serve_config, one_hop

# The environment of `rembg-serve up` per mode; the fast one named in full so that
# a caller's environment that turns it off cannot make both modes the same.
MODES: dict[str, dict[str, str]] = {
    "default": {
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1",
    },
    "fast": dict(FAST_PATH),
    "one-hop": dict(FAST_PATH),
}
# The modes whose service runs the models in the ingress (one hop).
ONE_HOP = frozenset({"one-hop"})
GROUPS = ("proxy", "ingress", "model", "ray")
# Stand-in uploads: input -> requests measured (a full run, a quick one).
UPLOADS = {"64x64": 300, "1mp": 60}
QUICK_UPLOADS = {"64x64": 60, "1mp": 12}
WARMUP = {"64x64": 10, "1mp": 4}
CLIENTS = 2
DECODE_REPEATS = 20
# u2netp: closed-loop clients, seconds measured per service (a full run, a quick
# one) after an unmeasured load of WARMUP_S; the order the modes' services start in.
CONCURRENCY = 16
LOAD_S = 30.0
QUICK_LOAD_S = 8.0
WARMUP_S = 3.0
ORDER = ("default", "fast", "one-hop", "one-hop", "fast", "default")
QUICK_ORDER = ("default", "fast", "one-hop")
BURST_CLIENTS = 160
BURST_TIMEOUT_S = 120.0
BURST_PHOTO = "car-1.jpg"


def config_for(mode: str, args: Json | None = None) -> Json:
    """serve_config.yaml on a free port with ``args``, in ``mode``'s topology."""
    config = serve_config(free_port(), args=args)
    return one_hop(config) if mode in ONE_HOP else config


def tiny_jpeg(photo: Image.Image, side: int = 64) -> bytes:
    """``photo`` squeezed to ``side`` x ``side``, as a JPEG."""
    out = io.BytesIO()
    photo.resize((side, side), Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def process_groups(session: int) -> dict[str, list[int]]:
    """The service's processes by role (``GROUPS``): Serve's proxy (with HAProxy, its
    manager actor and the ``haproxy`` processes), the ingress replicas, the model
    replicas, and every other process of the session."""
    replicas = serve_replicas(session)
    groups = {
        "proxy": proxies(session),
        "ingress": [pid for pid, name in replicas.items() if name == "Ingress"],
        "model": [pid for pid, name in replicas.items() if name.startswith("Model_")],
    }
    known = {pid for group in groups.values() for pid in group}
    groups["ray"] = [pid for pid in session_processes(session) if pid not in known]
    return groups


def _send(service: Running, data: bytes, times: int) -> None:
    with service.client(timeout=120) as client:
        for _ in range(times):
            client.post("/remove", content=data).raise_for_status()


class Yardsticks:
    """D and each upload's pipeline in this process, sampled through the run."""

    def __init__(self, one_mp: bytes, uploads: dict[str, tuple[bytes, int]], model: Path) -> None:
        self.one_mp = one_mp
        self.uploads = {name: data for name, (data, _) in uploads.items()}
        self.model = OnnxModel(model, spec_for("u2netp"), RuntimeConfig(intra_op_threads=1), 1)
        self.decode_ms: list[float] = []
        self.pipeline_ms: dict[str, list[float]] = {name: [] for name in self.uploads}

    def sample(self) -> None:
        self.decode_ms.append(cpu_ms(partial(_pillow_decode, self.one_mp), DECODE_REPEATS)[0])
        for name, data in self.uploads.items():
            work = partial(remove, data, self.model)
            self.pipeline_ms[name].append(cpu_ms(work, DECODE_REPEATS)[0])

    def medians(self) -> tuple[float, dict[str, float]]:
        return statistics.median(self.decode_ms), {
            name: statistics.median(v) for name, v in self.pipeline_ms.items()
        }


def standin_cpu(
    directory: Path, mode: str, uploads: dict[str, tuple[bytes, int]], yardsticks: Yardsticks
) -> Json:
    """CPU ms per request of each process group (and of all) for each of ``uploads``
    (name -> (file, requests)), through a service with the stand-in model started in
    ``mode``; ``yardsticks`` sampled in it before and after the loads."""
    directory.mkdir()
    standin = standin_model(directory)
    args = {"refine_warmup": "off", "models": [{"name": "u2netp", "path": str(standin)}]}
    rows: Json = {}
    with running_service(directory, config_for(mode, args), env=MODES[mode]) as service:
        yardsticks.sample()
        for name, (data, count) in uploads.items():
            rows[name] = _cpu_per_request(service, data, count, WARMUP[name])
        yardsticks.sample()
    return rows


def _cpu_per_request(service: Running, data: bytes, count: int, warmup: int) -> Json:
    """CPU ms of each process group (and of all) per upload of ``data``, ``count``
    of them from ``CLIENTS`` closed-loop clients after ``warmup`` unmeasured."""
    session = service.process.pid
    _send(service, data, warmup)
    # Groups read again after: a process started meanwhile (a worker, a
    # replica) is counted whole, as all its CPU was spent in the window.
    before = _process_cpu(process_groups(session))
    each = [count // CLIENTS + (i < count % CLIENTS) for i in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(partial(_send, service, data), each))
    after = _process_cpu(process_groups(session))
    per = {g: (after.get(g, 0.0) - before.get(g, 0.0)) * 1000 / count for g in GROUPS}
    per["all"] = sum(per.values())
    return {
        "requests": count,
        "bytes": len(data),
        "cpu_ms": {g: round(v, 2) for g, v in per.items()},
    }


def echo_floor(directory: Path, data: bytes, count: int) -> Json:
    """CPU ms per upload of ``data`` of all processes, through a Serve app that
    does no work (``echo_app``) with serve_config.yaml's HTTP and logging settings,
    on the fast path: the floor of Serve's own request path."""
    directory.mkdir()
    stock = load_serve_config(SERVE_CONFIG)
    config: Json = {
        "proxy_location": stock["proxy_location"],
        "http_options": {**stock["http_options"], "port": free_port()},
        "logging_config": stock["logging_config"],
        "applications": [
            {"name": "echo", "route_prefix": "/", "import_path": "deployments.bench.echo_app:app"}
        ],
    }
    with running_service(directory, config, env=MODES["fast"]) as service:
        row = _cpu_per_request(service, data, count, WARMUP["64x64"])
    # The echo replica is not named Ingress: its CPU is in "ray"; only "all" is kept.
    return {"requests": row["requests"], "cpu_ms": row["cpu_ms"]["all"]}


def in_decodes(standin: Json, decode_ms: float, pipeline_ms: dict[str, float]) -> None:
    """Add to each row of ``standin`` its CPU in units of D and its plumbing: the
    served CPU of all processes minus the upload's pipeline in this process."""
    for rows in standin.values():
        for name, row in rows.items():
            row["cpu_x_decode"] = {g: round(v / decode_ms, 2) for g, v in row["cpu_ms"].items()}
            plumbing = row["cpu_ms"]["all"] - pipeline_ms[name]
            row["plumbing_ms"] = round(plumbing, 2)
            row["plumbing_x_decode"] = round(plumbing / decode_ms, 2)


def burst(url: str, data: bytes, clients: int = BURST_CLIENTS) -> Json:
    """``clients`` threads, released together, each POSTing ``data`` once: the
    statuses (0: the request raised) and the latency at the client of each."""
    gate = threading.Barrier(clients)
    # One TLS context for all: httpx builds one per client otherwise (~20 ms of
    # CPU each), which the crowd would take from the service it measures.
    tls = ssl.create_default_context()
    lock = threading.Lock()
    outcomes: list[tuple[int, float]] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=BURST_TIMEOUT_S, verify=tls) as http:
            gate.wait(timeout=60)
            started = time.perf_counter()
            try:
                status = http.post("/remove", content=data).status_code
            except httpx.HTTPError as exc:
                status = 0
                with lock:
                    errors.append(repr(exc))
            with lock:
                outcomes.append((status, time.perf_counter() - started))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    by_status: dict[int, list[float]] = {}
    for status, seconds in outcomes:
        by_status.setdefault(status, []).append(seconds)
    return {
        "clients": clients,
        "statuses": {str(s): len(v) for s, v in sorted(by_status.items())},
        "latency_ms": {str(s): percentiles(v) for s, v in sorted(by_status.items())},
        "errors": dict(Counter(errors).most_common(5)),
    }


def u2netp_runs(tmp: Path, images: dict[str, bytes], quick: bool) -> Json:
    """The c16 closed loop in each service of the A B (B A) order, and the burst in
    the first service of each mode (last: it makes the autoscaler add replicas)."""
    seconds, order = (QUICK_LOAD_S, QUICK_ORDER) if quick else (LOAD_S, ORDER)
    runs: list[Json] = []
    bursts: dict[str, Json] = {}
    photo = images.get(BURST_PHOTO) or next(iter(images.values()))
    for index, mode in enumerate(order):
        directory = tmp / f"fastpath-u2netp-{index}-{mode}"
        directory.mkdir()
        print(f"fastpath: u2netp, {mode} mode, c{CONCURRENCY} for {seconds:g} s ...", flush=True)
        with running_service(directory, config_for(mode), env=MODES[mode]) as service:
            run_load(service.url, images, CONCURRENCY, seconds=WARMUP_S)
            summary = run_load(service.url, images, CONCURRENCY, seconds=seconds).summary()
            runs.append(
                {
                    "mode": mode,
                    **{k: summary[k] for k in ("requests", "duration_s", "images_per_s")},
                    **{k: summary[k] for k in ("latency_ms", "statuses")},
                }
            )
            if mode not in bursts:
                print(f"fastpath: {BURST_CLIENTS} clients at once, {mode} mode ...", flush=True)
                bursts[mode] = burst(service.url, photo)
    modes: Json = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        rate = statistics.median(r["images_per_s"] for r in mine)
        p50 = statistics.median(r["latency_ms"].get("p50", 0.0) for r in mine)
        p99 = statistics.median(r["latency_ms"].get("p99", 0.0) for r in mine)
        modes[mode] = {
            "runs": len(mine),
            "images_per_s": round(rate, 2),
            "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1),
            "p99_over_p50": round(p99 / p50, 2) if p50 else None,
        }
    default = modes["default"]["images_per_s"]
    fast = modes["fast"]["images_per_s"]
    return {
        "concurrency": CONCURRENCY,
        "seconds": seconds,
        "order": list(order),
        "runs": runs,
        "modes": modes,
        "fast_over_default": round(fast / default, 3) if default else None,
        "one_hop_over_fast": round(modes["one-hop"]["images_per_s"] / fast, 3) if fast else None,
        "burst": bursts,
    }


def run_section(tmp: Path, images: dict[str, bytes], quick: bool) -> Json:
    source = images.get(BURST_PHOTO) or next(iter(images.values()))
    with Image.open(io.BytesIO(source)) as opened:
        photo = opened.convert("RGB")
    one_mp = make_input(photo, 1.0, "jpeg")
    counts = QUICK_UPLOADS if quick else UPLOADS
    uploads = {"64x64": (tiny_jpeg(photo), counts["64x64"]), "1mp": (one_mp, counts["1mp"])}
    (tmp / "fastpath-standin").mkdir()
    yardsticks = Yardsticks(one_mp, uploads, standin_model(tmp / "fastpath-standin"))
    yardsticks.sample()
    standin: Json = {}
    for mode in MODES:
        print(f"fastpath: CPU per request by process, stand-in model, {mode} mode ...", flush=True)
        directory = tmp / f"fastpath-standin-{mode}"
        standin[mode] = standin_cpu(directory, mode, uploads, yardsticks)
    print("fastpath: CPU per request of a Serve app that does no work ...", flush=True)
    tiny, count = uploads["64x64"]
    echo = echo_floor(tmp / "fastpath-echo", tiny, count)
    decode_ms, pipeline_ms = yardsticks.medians()
    in_decodes(standin, decode_ms, pipeline_ms)
    echo["cpu_x_decode"] = round(echo["cpu_ms"] / decode_ms, 2)
    results: Json = {
        "env": MODES,
        "decode_1mp_ms": round(decode_ms, 3),
        "decode_repeats": DECODE_REPEATS,
        "decode_samples_ms": [round(v, 3) for v in yardsticks.decode_ms],
        "pipeline_ms": {name: round(v, 3) for name, v in pipeline_ms.items()},
        "standin": standin,
        "echo_64x64": echo,
    }
    results["u2netp"] = u2netp_runs(tmp, images, quick)
    return results


def _burst_503_p95_s(part: Json) -> float | None:
    lat = part["latency_ms"].get("503")
    return lat["p95"] / 1000 if lat else None


def _others(part: Json) -> int:
    return sum(n for s, n in part["statuses"].items() if s not in ("200", "503"))


def targets(results: Json) -> list[tuple[str, float | bool | None, str, float | None]]:
    """Fast mode's figures against the issue's goals, the default's beside them (INFO)."""
    fixed = {m: r["64x64"]["cpu_x_decode"]["all"] for m, r in results["standin"].items()}
    photo = {m: r["1mp"]["cpu_x_decode"]["all"] for m, r in results["standin"].items()}
    u2 = results["u2netp"]
    spread = {m: r["p99_over_p50"] for m, r in u2["modes"].items()}
    bursts = u2["burst"]
    return [
        ("fast: 64x64 CPU/request, all procs / D", fixed["fast"], "<=", 1.5),
        ("default: 64x64 CPU/request, all / D", fixed["default"], "<=", None),
        ("one hop: 64x64 CPU/request, all / D", fixed["one-hop"], "<=", 1.5),
        ("fast: 1MP JPEG->PNG CPU, all procs / D", photo["fast"], "<=", 12.0),
        ("default: 1MP JPEG->PNG CPU, all / D", photo["default"], "<=", None),
        ("one hop: 1MP JPEG->PNG CPU, all / D", photo["one-hop"], "<=", 12.0),
        ("u2netp c16 img/s fast / default", u2["fast_over_default"], ">=", 1.0),
        ("u2netp c16 p99/p50 fast", spread["fast"], "<=", 2.0),
        ("u2netp c16 img/s one hop / fast", u2["one_hop_over_fast"], ">=", None),
        ("u2netp c16 p99/p50 one hop", spread["one-hop"], "<=", 2.0),
        ("u2netp c16 p99/p50 default", spread["default"], "<=", None),
        ("burst fast: only 200 and 503", _others(bursts["fast"]) == 0, "==", None),
        ("burst default: not 200 or 503", _others(bursts["default"]), "<=", None),
        ("burst fast: 503 p95 s", _burst_503_p95_s(bursts["fast"]), "<=", 1.0),
        ("burst default: 503 p95 s", _burst_503_p95_s(bursts["default"]), "<=", None),
    ]


def table(results: Json) -> list[str]:
    decode, samples = results["decode_1mp_ms"], results["decode_samples_ms"]
    lines = [
        "",
        "fastpath: Serve's fast path (HAProxy, throughput-optimized) against its default",
        f"D = Pillow's decode of the 1 MP JPEG here: {decode} ms CPU, the median of"
        f" {len(samples)} samples through the run ({min(samples)}-{max(samples)} ms),"
        f" each the median of {results['decode_repeats']}",
        "in process (stand-in model, one thread): "
        + ", ".join(
            f"{name} {ms} ms ({round(ms / decode, 2)} D)"
            for name, ms in results["pipeline_ms"].items()
        ),
        f"Serve's floor, fast path, an app that reads the upload and answers a fixed PNG:"
        f" 64x64 {results['echo_64x64']['cpu_ms']} ms ({results['echo_64x64']['cpu_x_decode']} D)"
        " of all processes",
        "",
        f"stand-in model, CPU ms per request by process group (x D), {CLIENTS} clients;"
        " plumbing: all minus in process",
        f"{'input':7}{'mode':>8}{'reqs':>6}"
        + "".join(f"{g:>14}" for g in (*GROUPS, "all", "plumbing")),
    ]
    for name in UPLOADS:
        for mode, rows in results["standin"].items():
            row = rows[name]
            cells = "".join(
                f"{row['cpu_ms'][g]:>7} ({row['cpu_x_decode'][g]})".rjust(14)
                for g in (*GROUPS, "all")
            )
            cells += f"{row['plumbing_ms']:>7} ({row['plumbing_x_decode']})".rjust(14)
            lines.append(f"{name:7}{mode:>8}{row['requests']:>6}{cells}")
    u2 = results["u2netp"]
    lines += [
        "",
        f"u2netp, c{u2['concurrency']} closed loop, {u2['seconds']:g} s per service,"
        f" order {' '.join(u2['order'])}: medians per mode",
        f"{'mode':8}{'runs':>5}{'img/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99/p50':>9}  img/s per run",
    ]
    for mode, m in u2["modes"].items():
        each = ", ".join(str(r["images_per_s"]) for r in u2["runs"] if r["mode"] == mode)
        lines.append(
            f"{mode:8}{m['runs']:>5}{m['images_per_s']:>8}{m['p50_ms']:>9}{m['p99_ms']:>9}"
            f"{m['p99_over_p50']!s:>9}  {each}"
        )
    lines.append(f"fast / default images/s: {u2['fast_over_default']}")
    lines.append(f"one hop / fast images/s: {u2['one_hop_over_fast']}")
    lines += ["", f"burst: {BURST_CLIENTS} clients at once, one POST /remove of {BURST_PHOTO} each"]
    lines.append(f"{'mode':8}{'503 p50 ms':>11}{'503 p95 ms':>11}{'200 p50 ms':>11}  statuses")
    for mode, part in u2["burst"].items():
        lat = part["latency_ms"]
        refused, ok = lat.get("503", {}), lat.get("200", {})
        lines.append(
            f"{mode:8}{refused.get('p50', '-')!s:>11}{refused.get('p95', '-')!s:>11}"
            f"{ok.get('p50', '-')!s:>11}  {part['statuses']}"
        )
    return lines
