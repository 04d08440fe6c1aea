"""The shared fixtures are real components: prove each one works and cleans up."""

from __future__ import annotations

import os
import ssl
import subprocess
import threading

import dbus
import pytest

from appliance.lab.bus import PrivateBus
from tests.conftest import TlsMaterial


def test_tls_material_handshakes_and_rejects_rogue(tls: TlsMaterial, port: int) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server.cert, tls.server.key)
    server_ctx.load_verify_locations(tls.ca.cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED

    import socket

    listener = socket.create_server(("127.0.0.1", port))
    outcomes: list[str] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    outcomes.append(s.getpeercert()["subject"][0][0][1])  # type: ignore[index]
            except ssl.SSLError as exc:
                outcomes.append(f"refused:{exc.reason}")

    thread = threading.Thread(target=serve)
    thread.start()
    for leaf in (tls.client, tls.rogue_client):
        ctx = ssl.create_default_context(cafile=str(tls.ca.cert))
        ctx.load_cert_chain(leaf.cert, leaf.key)
        try:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as s,
            ):
                s.recv(1)  # TLS 1.3: the server's verdict on our cert arrives after the handshake
        except (ssl.SSLError, ConnectionError):
            pass
    thread.join(10)
    listener.close()
    assert outcomes[0] == "process.test"
    assert outcomes[1].startswith("refused:")


def test_private_bus_is_system_like(private_bus: PrivateBus) -> None:
    conn = dbus.bus.BusConnection(private_bus.address)
    try:
        names = conn.list_names()
        assert "org.freedesktop.DBus" in names
        # Owning a name is denied by default, as on the system bus.
        with pytest.raises(dbus.exceptions.DBusException) as info:
            conn.request_name("org.secondsite.Nobody1")
        assert "AccessDenied" in info.value.get_dbus_name()
    finally:
        conn.close()
    pid = private_bus.process.pid
    private_bus.stop()
    assert private_bus.process.poll() is not None
    assert not os.path.exists(f"/proc/{pid}/status") or _zombie_or_gone(pid)


def _zombie_or_gone(pid: int) -> bool:
    out = subprocess.run(
        ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() in ("", "Z")
