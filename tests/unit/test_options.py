"""The request-options contract, no server: each route's model, its errors, its users."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT
from deployments.cli import options_from, parser
from deployments.options import (
    CutoutOptions,
    OptionsError,
    RembgForm,
    RemoveQuery,
    field_names,
    parse,
)

STATIC = ROOT / "deployments" / "static"


def test_rembg_form_fields_map_to_options() -> None:
    form = parse(
        RembgForm,
        {
            "model": "u2netp",
            "a": "true",
            "af": "200",
            "ab": "20",
            "ae": "5",
            "om": "false",
            "ppm": "1",
            "bgc": "255,255,255,255",
        },
    )
    assert form.model == "u2netp"
    assert form.cutout() == CutoutOptions(
        alpha_matting=True,
        alpha_matting_foreground_threshold=200,
        alpha_matting_background_threshold=20,
        alpha_matting_erode_size=5,
        post_process_mask=True,
        bgcolor=(255, 255, 255, 255),
    )


def test_query_options() -> None:
    query = parse(RemoveQuery, {"only_mask": "true", "format": "webp", "bgcolor": "#ff000080"})
    assert query.only_mask and query.format == "webp"
    assert query.bgcolor == (255, 0, 0, 128)
    # The compose record carries neither routing nor encoding.
    assert set(type(query.cutout()).model_fields) == set(CutoutOptions.model_fields)


@pytest.mark.parametrize(
    ("values", "want"),
    [
        ({"a": "", "om": "", "bgc": "", "model": ""}, RembgForm.model_validate({})),
        ({"a": " TRUE ", "om": "off"}, RembgForm.model_validate({"a": True})),
        ({"vm": "false"}, RembgForm.model_validate({})),
    ],
)
def test_rembg_spellings(values: dict[str, str], want: RembgForm) -> None:
    """rembg's blank form fields mean the default; booleans take its spellings."""
    assert parse(RembgForm, values) == want


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"af": "300"}, r"^af: .*less than or equal to 255, got '300'"),
        ({"ab": "-1"}, r"^ab: .*greater than or equal to 0"),
        ({"a": "maybe"}, r"^a: must be a boolean"),
        ({"ae": "x"}, r"^ae: .*integer"),
        ({"ae": "1000"}, r"^ae: .*100"),
        ({"bgc": "1,2"}, r"^bgc: must be 'R,G,B,A'"),
        ({"bgc": "0,0,0,256"}, r"R,G,B,A"),
        ({"extras": '{"model_path": "/etc/passwd"}'}, "extras is not supported"),
        ({"vm": "true"}, "vm .* is not supported"),
        ({"colour": "red"}, r"unknown parameter\(s\) colour; accepted: a, af, ab"),
        # The long names belong to POST /remove, not to rembg's form.
        ({"only_mask": "1"}, r"unknown parameter\(s\) only_mask"),
    ],
)
def test_rembg_bad_parameters(values: dict[str, str], match: str) -> None:
    with pytest.raises(OptionsError, match=match):
        parse(RembgForm, values)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"format": "gif"}, r"^format: .*'png' or 'webp', got 'gif'"),
        ({"onlymask": "1"}, r"unknown parameter\(s\) onlymask; accepted: alpha_matting"),
        ({"af": "1"}, r"unknown parameter\(s\) af"),
    ],
)
def test_query_bad_parameters(values: dict[str, str], match: str) -> None:
    with pytest.raises(OptionsError, match=match):
        parse(RemoveQuery, values)


@pytest.mark.parametrize(
    ("text", "want"),
    [("1,2,3", (1, 2, 3, 255)), ("#010203", (1, 2, 3, 255)), ("#01020304", (1, 2, 3, 4))],
)
def test_colours(text: str, want: tuple[int, int, int, int]) -> None:
    assert parse(RemoveQuery, {"bgcolor": text}).bgcolor == want


def test_query_params_round_trip() -> None:
    query = RemoveQuery(model="u2netp", only_mask=True, bgcolor=(255, 0, 0, 255), format="webp")
    params = query.query_params()
    assert params == {
        "model": "u2netp",
        "only_mask": "true",
        "bgcolor": "255,0,0,255",
        "format": "webp",
    }
    assert parse(RemoveQuery, params) == query
    assert RemoveQuery().query_params() == {}


def test_both_routes_take_every_cutout_option() -> None:
    cutout = set(CutoutOptions.model_fields)
    assert cutout <= set(RemoveQuery.model_fields) and cutout <= set(RembgForm.model_fields)
    # rembg's short names: one alias per option, all distinct.
    aliases = [RembgForm.model_fields[n].alias for n in cutout]
    assert None not in aliases and len(set(aliases)) == len(cutout)
    assert set(field_names(RembgForm)) == {"a", "af", "ab", "ae", "om", "ppm", "dc", "bgc", "model"}


def test_cli_has_a_flag_for_every_query_option() -> None:
    flags = "--only-mask --bgcolor #00ff00 --format webp --alpha-matting-erode-size 7"
    args = parser().parse_args(
        ["remove", "in.jpg", "-o", "out", *flags.split(), "-m", "u2netp", "--decontaminate"]
    )
    assert options_from(args) == RemoveQuery(
        only_mask=True,
        bgcolor=(0, 255, 0, 255),
        format="webp",
        alpha_matting_erode_size=7,
        model="u2netp",
        decontaminate=True,
    )
    # Older spellings still work.
    old = parser().parse_args(["remove", "x", "-o", "y", "-a", "--erode-size", "3"])
    assert options_from(old) == RemoveQuery(alpha_matting=True, alpha_matting_erode_size=3)


def test_web_page_sends_only_query_options() -> None:
    page = (STATIC / "index.html").read_text()
    sent = set(re.findall(r'params\.set\("([a-z_]+)"', page))
    assert sent and sent <= set(RemoveQuery.model_fields), sent - set(RemoveQuery.model_fields)
