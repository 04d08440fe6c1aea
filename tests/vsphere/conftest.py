"""A logged-in session to the module's vcsim, pinned to the certificate it printed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.vsphere.session import Endpoint, Session, connect
from tests.vcsim.fixture import Vcsim


def endpoint_for(sim: Vcsim, **changes: object) -> Endpoint:
    fields: dict[str, object] = {
        "host": sim.host,
        "port": sim.port,
        "user": sim.user,
        "password": sim.password,
        "thumbprint": sim.cert_sha256,
        "timeout": 10.0,
    }
    fields.update(changes)
    return Endpoint(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def session(vcsim: Vcsim) -> Iterator[Session]:
    with connect(endpoint_for(vcsim)) as s:
        yield s
