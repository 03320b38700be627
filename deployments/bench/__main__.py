"""``python -m deployments.bench``: the benchmark, every figure from one run on one machine.

Sections (all by default): ``stages`` (the CPU each stage outside the model costs
per megapixel, against Pillow's decode, exact and fast), ``fidelity`` (the fast
cut-out against the exact one on every photo and generated case: its quality
gate), ``throughput`` (the model limit, the same stages in process, the service
over HTTP and ``rembg s`` side by side), ``cold`` (a start until the first
cut-out, the first matting request, a new replica under load), ``bulk``
(``rembg-serve batch`` on Ray Data against the HTTP path, same images) and
``fastpath`` (Ray Serve's fast path, HAProxy and the throughput-optimized mode,
against its default: the CPU of each process per request, u2netp's throughput and
latency, a burst of clients at once). It prints
a table with each target marked PASS or FAIL and writes everything as JSON, with
the machine and the date. Compare the ratios, not the absolute figures: machines
differ several times in raw speed. ``python -m deployments.bench report`` renders
such a JSON into tests/README.md's figures section (deployments/bench/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deployments.bench import bulk, cold, fastpath, fidelity, report, stages, throughput
from deployments.bench.harness import ROOT, Json, rembg_home, shared_images

SECTIONS = ("stages", "fidelity", "throughput", "cold", "bulk", "fastpath")


def machine() -> Json:
    """What the figures depend on: the CPU, its cores and memory, the software's versions.

    No host name and no load: a run names the kind of machine, not the day.
    """
    import onnxruntime
    import ray

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "system": platform.system(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "ray": ray.__version__,
    }


def judged(name: str, value: Any, op: str, goal: float | None) -> Json:
    if value is None:
        return {"name": name, "value": None, "goal": f"{op} {goal}", "result": "SKIP"}
    if isinstance(value, bool):
        return {"name": name, "value": value, "goal": "true", "result": "PASS" if value else "FAIL"}
    if goal is None:  # a figure reported beside the targets, with no goal of its own
        return {"name": name, "value": round(float(value), 3), "goal": "-", "result": "INFO"}
    ok = value >= goal if op == ">=" else value <= goal
    return {
        "name": name,
        "value": round(float(value), 3),
        "goal": f"{op} {goal}",
        "result": "PASS" if ok else "FAIL",
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.bench",
        description=__doc__,
        epilog="python -m deployments.bench report --help: the figures of tests/README.md",
    )
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"of {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    parser.add_argument(
        "--requests", type=int, default=48, help="requests per load phase (at least 2x its clients)"
    )
    parser.add_argument(
        "--bulk-images", type=int, default=520, help="images of the bulk section (%(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="few requests (for tests)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-python", type=Path, default=throughput.PEER_VENV / "bin" / "python")
    parser.add_argument(
        "--setup-peer",
        action="store_true",
        help=f"create {throughput.PEER_VENV.name} with {' '.join(throughput.PEER_REQUIREMENTS)}",
    )
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(
            f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report.main(argv[1:])
    args = parse(argv)
    sections = args.sections or list(SECTIONS)
    images = shared_images()
    results: Json = {
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": argv,
    }
    targets: list[Json] = []
    lines: list[str] = [f"machine: {report.describe_machine(results['machine'])}", ""]
    with tempfile.TemporaryDirectory(prefix="rembg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        home = rembg_home(tmp)
        if "stages" in sections:
            part = stages.run_section(tmp, images, args.quick)
            results["stages"] = part
            targets += [judged(*t) for t in stages.targets(part)]
            lines += stages.table(part)
        if "fidelity" in sections:
            part = fidelity.run_section(stages.u2netp(), images, args.quick)
            results["fidelity"] = part
            targets += [judged(*t) for t in fidelity.targets(part)]
            lines += fidelity.table(part)
        if "throughput" in sections:
            peer: Path | None = None
            if not args.skip_peer:
                peer = throughput.setup_peer() if args.setup_peer else args.peer_python
                if not peer.exists():
                    print(f"no peer python at {peer}: run with --setup-peer", file=sys.stderr)
                    return 2
            part = throughput.run(
                tmp,
                images,
                home,
                requests=8 if args.quick else args.requests,
                quick=args.quick,
                peer_python=peer,
            )
            results["throughput"] = part
            targets += [judged(*t) for t in throughput.targets(part)]
            lines += throughput.table(part)
        if "cold" in sections:
            part = cold.run(tmp, images)
            results["cold"] = part
            targets += [judged(*t) for t in cold.targets(part)]
            lines += cold.table(part)
        if "bulk" in sections:
            count = 12 if args.quick else args.bulk_images
            part = bulk.run_section(tmp, images, count, args.quick)
            results["bulk"] = part
            targets += [judged(*t) for t in bulk.targets(part)]
            lines += bulk.table(part)
        if "fastpath" in sections:
            part = fastpath.run_section(tmp, images, args.quick)
            results["fastpath"] = part
            targets += [judged(*t) for t in fastpath.targets(part)]
            lines += fastpath.table(part)
    results["targets"] = targets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    lines += ["", f"{'target':40}{'value':>10}  {'goal':>9}  result"]
    for t in targets:
        lines.append(f"{t['name']:40}{t['value']!s:>10}  {t['goal']:>9}  {t['result']}")
    print("\n".join(lines))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
