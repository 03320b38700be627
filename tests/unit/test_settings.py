"""Security settings refused at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.settings import AppSettings


def test_settings_refuse_short_api_key() -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        AppSettings(api_key="short")
