"""A network namespace with a veth pair, for setup's netlink changes; and a systemd
user instance (`user_systemd`, see user_systemd.py) for the roles and units.

Both ends live inside the namespace (nothing is added to the host's), and the
namespace is removed at teardown even when the test failed; removing it destroys
the pair.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.setup.user_systemd import UserSystemd, user_systemd_instance

pyroute2 = pytest.importorskip("pyroute2")

_counter = itertools.count()


@dataclass(frozen=True)
class Veth:
    netns: str
    inner: str  # the appliance's side: setup configures this one
    outer: str  # the "switch" side, also in the namespace

    def iproute(self) -> Any:
        return pyroute2.IPRoute(netns=self.netns)


@pytest.fixture
def veth() -> Iterator[Veth]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"ss-setup-{os.getpid()}-{next(_counter)}"
    pyroute2.netns.create(name)
    try:
        with pyroute2.IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="eth1", kind="veth", peer="sw1")
            for ifname in ("eth1", "sw1"):
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
        yield Veth(name, "eth1", "sw1")
    finally:
        pyroute2.netns.remove(name)


@pytest.fixture
def user_systemd(tmp_path: Path) -> Iterator[UserSystemd]:
    """A systemd user instance with journald, in private namespaces (user_systemd.py)."""
    yield from user_systemd_instance(tmp_path)


def ns_iproute(netns: str) -> Any:
    return partial(pyroute2.IPRoute, netns=netns)
