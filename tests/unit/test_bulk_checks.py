"""Bulk mode without Ray: arguments refused before Ray starts, the pixel budget."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deployments.admission import PixelBudget
from deployments.cli import main


def test_cli_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["batch", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["batch", str(tmp_path), str(tmp_path / "out"), "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["batch", str(tmp_path), str(tmp_path / "out"), "--bgcolor", "red"]) == 2
    assert "bgcolor" in capsys.readouterr().err
    # A known model that is not in the store (an empty one here): said before Ray starts.
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "store"))
    assert main(["batch", str(tmp_path), str(tmp_path / "out"), "--model", "u2net"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "rembg-serve fetch u2net" in err, err
    assert not (tmp_path / "out").exists()


def test_pixel_budget_waits_for_room_and_takes_at_most_all_of_it() -> None:
    budget = PixelBudget(100)
    entered = threading.Event()

    def second() -> None:
        with budget.hold_sync(50):
            entered.set()

    with budget.hold_sync(80):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.3), "80 + 50 pixels held at once in a budget of 100"
    assert entered.wait(5)
    thread.join()
    # A batch larger than the whole budget takes all of it (the limits let one
    # image fit), never waiting for room that cannot come.
    with budget.hold_sync(10**9):
        assert budget.free == 0
    assert budget.free == 100
