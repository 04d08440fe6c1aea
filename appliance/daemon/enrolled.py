"""A component's enrolment with the configuration server, on its side.

`enrol` runs the passphrase exchange (`appliance.wire.enrol`), stores the certificate,
key and CA under STATE/tls/ and the configuration server's address in
STATE/enrolment.json. `load` reads that file back when the daemon starts: a component
that has one reports to the configuration server; one without runs on its static
configuration alone.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.daemon.cli import ConfigError, OperatorError, Unavailable
from appliance.settings import host_port, parse_host_port
from appliance.storage.atomic import atomic_write
from appliance.wire.enrol import EnrolFailed, enrol_sync
from appliance.wire.heartbeat import Build, OnAnswer, Reporter
from appliance.wire.server import WireServer
from appliance.wire.tls import client_context

FILE = "enrolment.json"
MAX_PASSPHRASE = 256


@dataclass(frozen=True)
class Enrolled:
    config_server: str  # HOST:PORT
    name: str
    kind: str
    serial: str
    assignment: dict[str, Any]

    @property
    def address(self) -> tuple[str, int]:
        return parse_host_port(self.config_server)

    def client_context(self, tls_dir: Path, stem: str) -> ssl.SSLContext:
        try:
            return client_context(
                tls_dir / f"{stem}.crt", tls_dir / f"{stem}.key", tls_dir / "ca.crt"
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"cannot load the enrolled TLS material in {tls_dir}: {exc}", "enrol again"
            ) from None


def read_passphrase(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise OperatorError(f"cannot read the passphrase file {path}: {exc.strerror}") from None
    if not text or len(text) > MAX_PASSPHRASE:
        raise OperatorError(
            f"the passphrase file {path} is empty or too long",
            "secondsitectl passphrase shows it on the configuration server",
        )
    return text


def enrol(
    state_dir: Path,
    server: str,
    passphrase_file: Path,
    *,
    name: str,
    kind: str,
    sans: list[str],
    facts: dict[str, Any],
    stem: str,
) -> Enrolled:
    """Enrol and store the result; OperatorError with the server's reason otherwise."""
    if (problem := host_port(server)) is not None:
        raise OperatorError(f"--server {server}: {problem}")
    host, port = parse_host_port(server)
    passphrase = read_passphrase(passphrase_file)
    try:
        result = enrol_sync(host, port, passphrase, name=name, kind=kind, sans=sans, facts=facts)
    except EnrolFailed as exc:
        raise OperatorError(f"enrolment refused: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach the configuration server at {server}: {exc}") from None
    tls_dir = state_dir / "tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    result.save(tls_dir, stem)
    enrolled = Enrolled(server, name, kind, result.serial, dict(result.assignment))
    atomic_write(state_dir / FILE, json.dumps(asdict(enrolled), indent=1).encode() + b"\n")
    return enrolled


def load(state_dir: Path) -> Enrolled | None:
    path = state_dir / FILE
    try:
        data = json.loads(path.read_bytes())
        return Enrolled(
            str(data["config_server"]),
            str(data["name"]),
            str(data["kind"]),
            str(data["serial"]),
            dict(data.get("assignment") or {}),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}", "enrol again") from None


def reporter(
    enrolled: Enrolled, state_dir: Path, stem: str, *, build: Build, on_answer: OnAnswer
) -> Reporter:
    """The loop that reports to the configuration server this component enrolled with."""
    host, port = enrolled.address
    return Reporter(
        host,
        port,
        enrolled.client_context(state_dir / "tls", stem),
        name=enrolled.name,
        role=enrolled.kind,
        build=build,
        on_answer=on_answer,
        interval=float(enrolled.assignment.get("report_interval", 10.0)),
    )


def disk_space(path: Path) -> dict[str, int]:
    """capacity_bytes and free_bytes of the filesystem holding `path`, for reports."""
    st = os.statvfs(path)
    return {"capacity_bytes": st.f_blocks * st.f_frsize, "free_bytes": st.f_bavail * st.f_frsize}


def server_reporting(
    state_dir: Path, stem: str, build: Build, server: WireServer
) -> list[Coroutine[Any, Any, None]]:
    """A role server's report loop, if it enrolled (none otherwise): the answers'
    revoked serials are refused by `server` from then on, live connections cut."""
    enrolled = load(state_dir)
    if enrolled is None:
        return []

    def answered(answer: dict[str, Any]) -> None:
        server.revoke(set(answer.get("revoked", ())))

    return [reporter(enrolled, state_dir, stem, build=build, on_answer=answered).run()]
