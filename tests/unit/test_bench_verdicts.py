"""The benchmark's verdicts follow from its figures: each target's PASS, FAIL, SKIP or
INFO, and the figure a target is judged on (tests/slow/test_bench.py runs it)."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.bench import stages
from deployments.bench.__main__ import judged


@pytest.mark.parametrize(
    ("value", "op", "goal", "result"),
    [
        (1.3, ">=", 1.3, "PASS"),
        (1.29, ">=", 1.3, "FAIL"),
        (5.5, "<=", 5.5, "PASS"),
        (5.51, "<=", 5.5, "FAIL"),
        (True, "==", None, "PASS"),
        (False, "==", None, "FAIL"),
        (None, "<=", 5.5, "SKIP"),
        (4.56789, "<=", None, "INFO"),
    ],
)
def test_verdict_follows_from_the_figure_and_goal(
    value: Any, op: str, goal: float | None, result: str
) -> None:
    assert judged("t", value, op, goal)["result"] == result


def test_a_figure_is_reported_rounded_beside_its_goal() -> None:
    assert judged("t", 4.56789, "<=", 5.5) == {
        "name": "t",
        "value": 4.568,
        "goal": "<= 5.5",
        "result": "PASS",
    }


def _stage_results(served: list[tuple[float, float]]) -> dict[str, Any]:
    jpeg = [
        {"input": "jpeg", "megapixels": mp, "default_total_x_pillow_decode": x}
        for mp, x in ((0.5, 4.2), (2.0, 4.6))
    ]
    # The fast rows cost a little less; the exact ones are judged against the goal.
    rows = [
        {"megapixels": mp, "fidelity": fidelity, "outside_model_x_pillow_decode": x - cut}
        for mp, x in served
        for fidelity, cut in (("exact", 0.0), ("fast", 0.5))
    ]
    return {
        "rows": [
            *jpeg,
            {"input": "png", "megapixels": 2.0, "default_total_x_pillow_decode": 9.0},
        ],
        "served": {"rows": rows},
    }


@pytest.mark.parametrize(
    ("served", "worst", "result"),
    [
        # The tiny upload's ratio (Serve's fixed cost over 0.02 MP) is not judged.
        ([(0.02, 40.0), (2.0, 5.1), (12.0, 4.0)], 5.1, "PASS"),
        ([(0.02, 1.0), (2.0, 5.0), (12.0, 5.7)], 5.7, "FAIL"),
    ],
)
def test_stages_judge_the_worst_served_photo_and_the_worst_jpeg(
    served: list[tuple[float, float]], worst: float, result: str
) -> None:
    targets = {t["name"]: t for t in (judged(*t) for t in stages.targets(_stage_results(served)))}
    assert targets["served JPEG->PNG CPU/MP outside model / decode"] == {
        "name": "served JPEG->PNG CPU/MP outside model / decode",
        "value": worst,
        "goal": "<= 5.5",
        "result": result,
    }
    # The in-process ratio is reported (worst JPEG, not the PNG row), not judged.
    stage = targets["stages JPEG->PNG CPU/MP / Pillow decode"]
    assert (stage["value"], stage["result"]) == (4.6, "INFO")
