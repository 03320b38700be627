"""Where the API key comes from (``deployments.api.api_key_from``; no Ray)."""

from __future__ import annotations

import pytest

from deployments.api import api_key_from

KEY = "test-key-0123456789abcdef"


@pytest.mark.parametrize(
    "value", [KEY, KEY + "\n", f"  {KEY}\r\n"], ids=["as-is", "lf", "spaces-crlf"]
)
def test_key_from_the_environment_is_stripped(value: str) -> None:
    assert api_key_from(None, "REMBG_API_KEY", {"REMBG_API_KEY": value}) == KEY


@pytest.mark.parametrize(
    "environ", [{}, {"REMBG_API_KEY": ""}, {"REMBG_API_KEY": " \n"}, {"REMBG_API_KEY": "short\n"}]
)
def test_missing_empty_or_short_key_refuses_to_start(environ: dict[str, str]) -> None:
    with pytest.raises(RuntimeError, match="REMBG_API_KEY"):
        api_key_from(None, "REMBG_API_KEY", environ)


def test_key_in_the_config_wins_and_no_key_means_open() -> None:
    assert api_key_from(KEY, "REMBG_API_KEY", {}) == KEY
    assert api_key_from(None, None, {"REMBG_API_KEY": "other-key-0123456789"}) is None
