"""Connecting: the thumbprint pin, CA verification, and each way a login can fail."""

from __future__ import annotations

import socket
import time

import pytest
from pyVmomi import vim

from appliance.vsphere.errors import (
    BadCredentials,
    NotFound,
    Unreachable,
    UntrustedCertificate,
)
from appliance.vsphere.session import (
    Endpoint,
    Session,
    connect,
    normalize_thumbprint,
    probe_thumbprint,
)
from tests.vcsim.fixture import Vcsim
from tests.vsphere.conftest import endpoint_for

pytestmark = [pytest.mark.integration]


def test_probe_shows_the_served_certificate(vcsim: Vcsim) -> None:
    assert probe_thumbprint(vcsim.host, vcsim.port) == vcsim.cert_sha256


def test_connect_with_the_pinned_thumbprint_and_log_out(vcsim: Vcsim) -> None:
    # Any spelling of the same SHA-256 pins the same certificate.
    lower = vcsim.cert_sha256.replace(":", "").lower()
    with connect(endpoint_for(vcsim, thumbprint=lower)) as s:
        assert s.content.about.apiType == "VirtualCenter"
        assert s.content.sessionManager.currentSession.userName == vcsim.user
        manager = s.content.sessionManager
    # Logged out: the server no longer knows the session's cookie.
    with pytest.raises(vim.fault.NotAuthenticated):
        manager.currentSession  # noqa: B018


def test_a_wrong_thumbprint_is_refused_with_the_one_seen(vcsim: Vcsim) -> None:
    wrong = ":".join(["AB"] * 32)
    with pytest.raises(UntrustedCertificate) as info:
        connect(endpoint_for(vcsim, thumbprint=wrong))
    assert info.value.thumbprint == vcsim.cert_sha256
    assert vcsim.cert_sha256 in str(info.value)


def test_without_a_pin_the_self_signed_certificate_is_not_trusted(vcsim: Vcsim) -> None:
    with pytest.raises(UntrustedCertificate) as info:
        connect(endpoint_for(vcsim, thumbprint=None))
    assert info.value.thumbprint == vcsim.cert_sha256


def test_sha1_or_malformed_pins_are_rejected_up_front(vcsim: Vcsim) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        endpoint_for(vcsim, thumbprint=vcsim.cert_sha1)
    with pytest.raises(ValueError, match="SHA-256"):
        normalize_thumbprint("zz" * 32)


def test_wrong_password_is_bad_credentials(vcsim: Vcsim) -> None:
    with pytest.raises(BadCredentials):
        connect(endpoint_for(vcsim, password=vcsim.password + "x"))


def test_password_is_not_in_the_repr(vcsim: Vcsim) -> None:
    assert vcsim.password not in repr(endpoint_for(vcsim))


def test_closed_port_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        endpoint = Endpoint("127.0.0.1", "u", "p", port=port, thumbprint="00" * 32, timeout=5)
        started = time.monotonic()
        with pytest.raises(Unreachable):
            connect(endpoint)
        with pytest.raises(Unreachable):
            probe_thumbprint("127.0.0.1", port, timeout=5)
    assert time.monotonic() - started < 5


def test_silent_peer_times_out_as_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # accepts TCP, never speaks TLS
        port = s.getsockname()[1]
        endpoint = Endpoint("127.0.0.1", "u", "p", port=port, thumbprint="00" * 32, timeout=1)
        started = time.monotonic()
        with pytest.raises(Unreachable):
            connect(endpoint)
    assert time.monotonic() - started < 5


def test_session_lookups(session: Session) -> None:
    names = {vm.name for vm in session.objects(vim.VirtualMachine)}
    assert "DC0_H0_VM0" in names
    with pytest.raises(NotFound):
        session.ref(vim.VirtualMachine, "vm-does-not-exist")
