"""Fixtures: the agent bundle (built once per session), SSH keys, a source host."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.lab.bus import PrivateBus
from appliance.push.bundle import Bundle, Platform, build_bundle
from tests.conftest import TlsMaterial
from tests.integration.configsite import Site, start_site
from tests.push.host import SourceHost, keypair, source_host

# This machine is the "host": its Python, architecture and glibc.
HERE = Platform("3.11", "x86_64", "2.36")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build_bundle(tmp_path_factory.mktemp("bundles"), HERE)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return keypair(tmp_path / "id_push")


@pytest.fixture
def host(tmp_path: Path, key: Path) -> Iterator[SourceHost]:
    box = tmp_path / "host"
    box.mkdir()
    with source_host(box, key.with_suffix(".pub")) as h:
        yield h


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def site(
    tmp_path: Path, private_bus_factory: Callable[..., PrivateBus], tls: TlsMaterial
) -> Iterator[Site]:
    """A configd on a private bus (tests.integration.configsite)."""
    (tmp_path / "site").mkdir()
    yield from start_site(tmp_path / "site", private_bus_factory, tls)
