"""Request option parsing, no server."""

from __future__ import annotations

import pytest

from deployments.compose import RemoveOptions
from deployments.errors import BadParameter
from deployments.http import parse_color, query_options, rembg_options


def test_rembg_form_fields_map_to_options() -> None:
    options = rembg_options(
        {
            "model": "u2netp",
            "a": "true",
            "af": "200",
            "ab": "20",
            "ae": "5",
            "om": "false",
            "ppm": "1",
        },
        {"bgc": "255,255,255,255"},
    )
    assert options == RemoveOptions(
        model="u2netp",
        alpha_matting=True,
        foreground_threshold=200,
        background_threshold=20,
        erode_size=5,
        post_process_mask=True,
        bgcolor=(255, 255, 255, 255),
    )


def test_query_options() -> None:
    options = query_options({"only_mask": "true", "format": "webp", "bgcolor": "#ff000080"})
    assert options.only_mask and options.format == "webp"
    assert options.bgcolor == (255, 0, 0, 128)


@pytest.mark.parametrize(
    ("form", "query", "match"),
    [
        ({"af": "300"}, {}, "between 0 and 255"),
        ({"ab": "-1"}, {}, "between 0 and 255"),
        ({"a": "maybe"}, {}, "boolean"),
        ({"ae": "x"}, {}, "integer"),
        ({}, {"bgc": "1,2"}, "R,G,B,A"),
        ({}, {"bgc": "0,0,0,256"}, "R,G,B,A"),
        ({}, {"extras": '{"model_path": "/etc/passwd"}'}, "extras"),
        ({"colour": "red"}, {}, "unknown parameter"),
    ],
)
def test_rembg_bad_parameters(form: dict[str, str], query: dict[str, str], match: str) -> None:
    with pytest.raises(BadParameter, match=match):
        rembg_options(form, query)


@pytest.mark.parametrize(
    ("query", "match"),
    [({"format": "gif"}, "png or webp"), ({"onlymask": "1"}, "unknown parameter")],
)
def test_query_bad_parameters(query: dict[str, str], match: str) -> None:
    with pytest.raises(BadParameter, match=match):
        query_options(query)


@pytest.mark.parametrize(("text", "want"), [("1,2,3", (1, 2, 3, 255)), ("#010203", (1, 2, 3, 255))])
def test_parse_color(text: str, want: tuple[int, int, int, int]) -> None:
    assert parse_color("c", text) == want
