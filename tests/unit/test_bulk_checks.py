"""Bulk mode without Ray: arguments refused before Ray starts, the model a name
loads (dedicated, pooled, rembg's), the plan (nesting, temporaries, names,
resumes), the pixel budget."""

from __future__ import annotations

import threading
from pathlib import Path, PurePosixPath

import pytest

from conftest import gradient
from deployments import bulk_plan
from deployments.admission import PixelBudget
from deployments.bulk import model_config
from deployments.cli import main
from deployments.errors import ModelUnavailable
from deployments.files import PlanRefused, partial_name
from deployments.settings import AppSettings, ModelConfig


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


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gradient(16, 12).save(path)
    return path


def test_plan_deletes_only_its_own_leftovers(tmp_path: Path) -> None:
    _image(tmp_path / "in" / "sub" / "x.jpg")
    out = tmp_path / "out"
    users = [out / "notes.part", out / "sub" / "dl.part", out / "sub" / "x.png.part"]
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a user's")
    leftover = out / "sub" / partial_name("x.png")
    leftover.write_bytes(b"half")
    work = bulk_plan.plan(str(tmp_path / "in"), str(out), ".png")
    assert [Path(t).relative_to(out).as_posix() for _, t in work.todo] == ["sub/x.png"]
    assert not leftover.exists() and all(p.read_bytes() == b"a user's" for p in users)


def test_plan_with_the_input_inside_the_output_or_around_it(tmp_path: Path) -> None:
    shots = tmp_path / "shots"
    _image(shots / "raw" / "a.jpg")
    # batch shots/raw shots: the outputs beside raw/, never a silent no-op.
    work = bulk_plan.plan(str(shots / "raw"), str(shots), ".png")
    assert work.todo == [(str(shots / "raw" / "a.jpg"), str(shots / "a.png"))]
    # An output folder inside the input: its files are not inputs.
    _image(shots / "raw" / "out" / "old.png")
    work = bulk_plan.plan(str(shots / "raw"), str(shots / "raw" / "out"), ".png")
    assert [src for src, _ in work.todo] == [str(shots / "raw" / "a.jpg")]
    # One output would land in the input (raw/raw/b.jpg -> shots/raw/b.png): refused.
    _image(shots / "raw" / "raw" / "b.jpg")
    with pytest.raises(PlanRefused, match="inside INPUT"):
        bulk_plan.plan(str(shots / "raw"), str(shots), ".png")
    with pytest.raises(PlanRefused, match="inside INPUT"):
        bulk_plan.plan(str(shots), str(shots), ".png")


def test_batch_refuses_nesting_with_a_message_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _image(tmp_path / "shots" / "a.jpg")
    assert main(["batch", str(tmp_path / "shots"), str(tmp_path / "shots"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "inside INPUT" in err and "choose an OUTPUT outside INPUT" in err
    assert sorted(p.name for p in (tmp_path / "shots").iterdir()) == ["a.jpg"]


def test_a_key_with_dots_never_maps_outside_the_output() -> None:
    inputs = [
        ("b/in/ok.jpg", PurePosixPath("ok.jpg")),
        ("b/in/../../x.jpg", PurePosixPath("../../x.jpg")),
        ("b/in/a/../y.jpg", PurePosixPath("a/../y.jpg")),
        ("b/in//z.jpg", PurePosixPath("/z.jpg")),
    ]
    pairs, refused = bulk_plan.map_outputs(inputs, "b/out", ".png")
    assert pairs == [("b/in/ok.jpg", "b/out/ok.png")]
    assert [(src, status) for src, status, _ in refused] == [(s, 400) for s, _ in inputs[1:]]
    assert all("would leave OUTPUT" in message for _, _, message in refused)


def test_a_glob_follows_a_symlink_out_of_its_folder(tmp_path: Path) -> None:
    outside = _image(tmp_path / "elsewhere" / "e.jpg")
    _image(tmp_path / "g" / "a.jpg")
    (tmp_path / "g" / "link.jpg").symlink_to(outside)
    found = bulk_plan.list_inputs(str(tmp_path / "g" / "*.jpg"))
    assert [rel.as_posix() for _, rel in found] == ["a.jpg", "link.jpg"]
    # A match the glob reaches through ".." is a failure line of the plan, not a crash.
    (tmp_path / "g" / "sub").mkdir()
    pattern = tmp_path / "g" / "*" / ".." / ".." / "elsewhere" / "*.jpg"
    work = bulk_plan.plan(str(pattern), str(tmp_path / "o"), ".png")
    assert work.todo == []
    assert [(Path(src).name, status) for src, status, _ in work.refused] == [("e.jpg", 400)]


def test_an_empty_or_undecodable_output_is_redone(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _image(tmp_path / "in" / f"{name}.jpg")
    out = tmp_path / "out"
    _image(out / "a.png")
    (out / "b.png").write_bytes(b"")
    (out / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n then nothing")
    work = bulk_plan.plan(str(tmp_path / "in"), str(out), ".png")
    assert work.skipped == 1
    assert [Path(t).name for _, t in work.todo] == ["b.png", "c.png"]


@pytest.mark.parametrize(
    ("pixels", "groups"),
    [
        ([40, 40, 40, 40], [[0, 1], [2, 3]]),
        ([100, 10, 90, 5], [[0], [1, 2], [3]]),
        ([30, 30, 30], [[0, 1, 2]]),
        ([], []),
    ],
)
def test_a_batch_is_decoded_in_groups_within_the_budget(
    pixels: list[int], groups: list[list[int]]
) -> None:
    got = bulk_plan.budget_groups(pixels, 100)
    assert got == groups
    assert all(sum(pixels[i] for i in group) <= 100 for group in got)


def _pooled_settings(tmp_path: Path) -> AppSettings:
    return AppSettings.model_validate(
        {
            "models": [{"name": "u2netp"}, {"name": "silueta", "path": str(tmp_path / "s.onnx")}],
            "pool": {
                "models": [
                    {"name": "sharp", "model": "u2netp", "path": str(tmp_path / "sharp.onnx")},
                    {"name": "isnet-general-use"},
                ],
                "budget_bytes": 10**9,
            },
            "default_model": "sharp",
        }
    )


def test_bulk_loads_a_pooled_model_as_the_pool_would(tmp_path: Path) -> None:
    settings = _pooled_settings(tmp_path)
    # Dedicated: its own config, path and all.
    assert model_config(settings, "silueta") == settings.models[1]
    # Pooled: its table entry's constants and its file, as the pool resolves them.
    sharp = ModelConfig(name="u2netp", path=tmp_path / "sharp.onnx")
    assert model_config(settings, "sharp") == sharp
    assert model_config(settings, None) == sharp  # the default may be pooled
    assert model_config(settings, "isnet-general-use") == ModelConfig(name="isnet-general-use")
    # A table model this config does not serve: rembg's store, as before pools.
    assert model_config(settings, "u2net") == ModelConfig(name="u2net")
    with pytest.raises(ModelUnavailable, match="unknown model 'nope'") as raised:
        model_config(settings, "nope")
    assert "dedicated: u2netp, silueta; pooled: sharp, isnet-general-use" in str(raised.value)


def test_cli_batch_takes_a_pooled_name_and_refuses_an_unknown_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve_config.yaml"
    config.write_text(
        "applications:\n  - import_path: deployments.serve_app:build_app\n    args:\n"
        "      pool:\n        budget_bytes: 1000000000\n        models:\n"
        f"          - {{name: sharp, model: u2netp, path: {tmp_path / 'missing.onnx'}}}\n"
    )
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    args = ["batch", str(src), str(out), "--config", str(config)]
    assert main([*args, "--model", "nope"]) == 2
    assert "unknown model 'nope'; dedicated: u2netp; pooled: sharp" in capsys.readouterr().err
    # The pooled name is taken: its file, missing here, is what is said, before Ray starts.
    assert main([*args, "--model", "sharp"]) == 2
    err = capsys.readouterr().err
    assert "pooled model 'sharp'" in err and str(tmp_path / "missing.onnx") in err, err
    assert not out.exists()
