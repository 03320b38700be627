"""The figures renderer (deployments/bench/report.py) on a small run made here; no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deployments.bench import report

README = f"""# Tests

The guide stays as it is.

## Figures

{report.BEGIN}
typed by hand: 9.99 images/s
{report.END}

## After

Also untouched.
"""


def sample_run() -> dict[str, Any]:
    return {
        "machine": {
            "cpu": "Example CPU @ 2.0GHz",
            "cores": 2,
            "memory_gib": 23.4,
            "system": "Linux",
            "arch": "x86_64",
            "python": "3.11.9",
            "onnxruntime": "1.31.1",
            "ray": "2.60.0",
        },
        "date": "2026-12-02T13:45:07+00:00",
        "argv": ["bulk", "--bulk-images", "24"],
        "bulk": {
            "images": 24,
            "megapixels": 21.5,
            "model_limit": {"images_per_s": 5.84},
            "pipeline": {"images_per_s": 5.14},
            "bulk": {
                "images_per_s": 4.51,
                "megapixels_per_s": 4.04,
                "seconds": 5.3,
                "first_results_s": 2.25,
                "steady_images_per_s": 4.72,
                "actor_rss_mib": {"actor-1": [1387.2, 1407.9]},
            },
            "http": {"images_per_s": 4.0, "concurrency": 16},
            "http_probe": {"4": 3.81, "8": 4.16, "16": 4.17},
        },
        "targets": [
            {"name": "bulk / in-process", "value": 0.877, "goal": ">= 0.9", "result": "FAIL"},
            {"name": "bulk / HTTP path", "value": 1.128, "goal": ">= 1.3", "result": "FAIL"},
            {"name": "outputs identical", "value": True, "goal": "true", "result": "PASS"},
            {"name": "skipped one", "value": None, "goal": ">= 1.0", "result": "SKIP"},
        ],
    }


def write(directory: Path, run: dict[str, Any]) -> tuple[Path, Path]:
    data = directory / "bench.json"
    data.write_text(json.dumps(run))
    readme = directory / "README.md"
    readme.write_text(README)
    return data, readme


def test_render_names_machine_date_command_and_every_figure() -> None:
    text = report.render(sample_run(), "tests/figures/bench.json")

    assert "from `tests/figures/bench.json`" in text
    assert (
        "- machine: Example CPU @ 2.0GHz, 2 cores, 23.4 GiB, Linux x86_64, Python 3.11.9,"
        " ONNX Runtime 1.31.1, Ray 2.60.0"
    ) in text
    assert "- date: 2026-12-02 13:45 UTC" in text
    assert "- command: `python -m deployments.bench bulk --bulk-images 24`" in text
    assert "quick mode" not in text
    # The section's table as the run printed it, fenced.
    assert "### bulk\n\n```text\nbulk: 24 images, 21.5 MP\n" in text
    assert "4.51 img/s, 4.04 MP/s" in text and "1387 -> 1408 MiB" in text
    assert "| bulk / in-process | 0.877 | >= 0.9 | FAIL |" in text
    assert "| outputs identical | True | true | PASS |" in text
    assert "| skipped one | - | >= 1.0 | SKIP |" in text
    assert "### throughput" not in text


def test_render_flags_a_quick_run_and_reads_an_older_machine_line() -> None:
    run = {"machine": "x86_64, 2 cores, Python 3.11.9", "argv": ["--quick"], "targets": []}
    text = report.render(run, "bench.json")

    assert "- machine: x86_64, 2 cores, Python 3.11.9" in text
    assert "- date: not recorded" in text
    assert "- quick mode:" in text
    assert "### Targets" not in text


def test_report_rewrites_only_the_figures_and_twice_changes_nothing(tmp_path: Path) -> None:
    data, readme = write(tmp_path, sample_run())
    argv = ["--json", str(data), "--readme", str(readme)]

    assert report.main([*argv, "--check"]) == 1
    assert readme.read_text() == README
    assert report.main(argv) == 0
    once = readme.read_text()
    assert report.main(argv) == 0
    assert readme.read_text() == once
    assert report.main([*argv, "--check"]) == 0

    assert "9.99" not in once
    head, rest = once.split(report.BEGIN)
    block, tail = rest.split(report.END)
    assert head == README.split(report.BEGIN)[0]
    assert tail == README.split(report.END)[1]
    assert block == "\n" + report.render(sample_run(), "bench.json") + "\n"


def test_without_a_run_the_section_says_how_to_make_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    monkeypatch.setattr(report, "DEFAULT_JSON", tmp_path / "absent.json")

    assert report.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "No run is recorded yet" in text
    assert "--out absent.json" in text and f"`{report.COMMAND}`" in text
    # Asked for by name, a missing file is an error, and nothing is written.
    readme.write_text(README)
    assert report.main(["--json", str(tmp_path / "absent.json"), "--readme", str(readme)]) == 2
    assert readme.read_text() == README


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{report.BEGIN}\nonly the first\n",
        f"{report.BEGIN}\n{report.END}\n{report.BEGIN}\n{report.END}\n",
        f"{report.END}\nthe wrong way round\n{report.BEGIN}\n",
    ],
)
def test_rewrite_refuses_a_file_without_exactly_one_section(text: str) -> None:
    with pytest.raises(ValueError, match="expected one"):
        report.rewrite(text, "figures")


def test_the_repository_readme_is_what_its_json_renders() -> None:
    # tests/README.md's section must be regenerated whenever the JSON changes.
    assert report.main(["--check"]) == 0
