"""Secondsite appliance roles and what they share."""

__version__ = "0.1.0"  # keep in step with pyproject.toml
