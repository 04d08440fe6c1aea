"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.lab.bus import PrivateBus
from tests.conftest import TlsMaterial
from tests.integration.configsite import Site, start_site


@pytest.fixture
def site(
    tmp_path: Path, private_bus_factory: Callable[..., PrivateBus], tls: TlsMaterial
) -> Iterator[Site]:
    """configd on a private bus with our policy; enrol daemons and agents through it."""
    yield from start_site(tmp_path, private_bus_factory, tls)
