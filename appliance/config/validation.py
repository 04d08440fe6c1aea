"""Checks shared by the configuration server's entry points."""

from __future__ import annotations

from appliance.config.errors import InvalidArgument

MAX_NAME = 253


def name(value: str, what: str = "name") -> str:
    """A non-empty string of bounded length (a machine, policy, plan, job, host...)."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} must be a non-empty string of at most {MAX_NAME} chars")
    return value
