"""`secondsite-configd`: the configuration server daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from appliance.config.ca import CertificateAuthority, Issued
from appliance.config.config import CONFIG_SETTINGS, DEFAULT_CONFIG, ConfigdConfig
from appliance.config.enrolment import Enroller, EnrolRequest, enrolment_server_context
from appliance.config.errors import ConfigServerError
from appliance.config.health import HealthSettings
from appliance.config.inventory import Inventory
from appliance.config.model import ComponentKind
from appliance.config.passphrase import PassphraseStore
from appliance.config.server import MAX_BODY, ConfigEndpoint
from appliance.config.service import ConfigService, ServiceSettings
from appliance.config.targets import TargetClient
from appliance.config.vcenters import SECRETS_FILE, VCenterStore
from appliance.daemon.cli import ConfigError, Unavailable, run_main
from appliance.daemon.logs import setup_logging
from appliance.daemon.runner import (
    EXIT_STATUS,
    add_common_arguments,
    config_path,
    listen,
    make_dirs,
    serve_until_stopped,
)
from appliance.daemon.sdnotify import Notifier
from appliance.settings import describe
from appliance.wire.connection import start_server
from appliance.wire.errors import ErrorCounters

PROG = "secondsite-configd"
log = logging.getLogger("secondsite.configd")

DESCRIPTION = """\
The Secondsite configuration server: the inventory of sites, servers, protected
machines, disks and policies (SQLite), the certificate authority every component
enrols with (a one-time passphrase proves the enrolling side; `secondsitectl
passphrase` shows it), health and RPO monitoring with alerts, and the jobs that
protect, unprotect and resync machines. Components enrol and report over TLS on its
listen port; administrators manage it over D-Bus (org.secondsite.Config1) with
secondsitectl and the console.
"""

EPILOG = f"""\
configuration file keys (TOML, [section] name = value):
{describe(CONFIG_SETTINGS)}

files:
  {DEFAULT_CONFIG}   configuration (optional; defaults apply when absent)
  STATE/inventory.db             the inventory (SQLite, WAL)
  STATE/ca/ca.crt, ca.key        the certificate authority (the key is root-only)
  STATE/passphrase.json          the enrolment passphrase (root-only)
  STATE/tls/                     this server's own certificate

{EXIT_STATUS}

Under systemd (Type=notify) it sends READY=1 once serving, STATUS= lines with the
machine counts, and WATCHDOG=1 when WatchdogSec= is set.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument("--bus", metavar="ADDRESS", help="overrides dbus.bus (none: no D-Bus)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    config = ConfigdConfig.load(
        config_path(args.config, DEFAULT_CONFIG),
        {"server.state_dir": args.state_dir, "server.listen": args.listen, "dbus.bus": args.bus},
    )
    if args.check_config:
        json.dump(config.as_dict(), sys.stdout, indent=2)
        print()
        return 0
    make_dirs(config.state_dir, config.state_dir / "tls")
    uvloop.run(serve(config))
    return 0


def _own_leaf(ca: CertificateAuthority, config: ConfigdConfig) -> tuple[Path, Path]:
    tls = config.state_dir / "tls"
    cert, key = tls / f"{config.name}.crt", tls / f"{config.name}.key"
    if not (cert.is_file() and key.is_file()):
        try:
            cert, key = ca.issue_local(config.name, ComponentKind.CONFIG, list(config.names), tls)
        except ConfigServerError as exc:
            raise ConfigError(
                f"cannot issue this server's certificate: {exc.message}",
                "check server.name and server.names",
            ) from None
    return cert, key


def _open(config: ConfigdConfig) -> tuple[CertificateAuthority, Inventory, PassphraseStore]:
    try:
        ca = CertificateAuthority.open_or_create(config.state_dir / "ca")
        inventory = Inventory.open(config.state_dir / "inventory.db")
    except ConfigServerError as exc:
        raise ConfigError(exc.message) from None
    except OSError as exc:
        raise Unavailable(f"cannot open the state in {config.state_dir}: {exc}") from None
    return ca, inventory, PassphraseStore(config.state_dir / "passphrase.json")


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


async def serve(config: ConfigdConfig, notifier: Notifier | None = None) -> None:
    notifier = notifier or Notifier()
    ca, inventory, passphrases = _open(config)
    cert, key = _own_leaf(ca, config)
    targets = TargetClient(cert, key, ca.ca_path, name=config.name)
    service = ConfigService(
        inventory,
        passphrases,
        ServiceSettings(
            health=HealthSettings(config.agent_timeout, config.server_timeout),
            report_interval=config.report_interval,
            auto_protect=config.auto_protect,
            address=f"{config.names[0]}:{config.port}",
        ),
        target_call=targets.call,
        vcenters=VCenterStore(inventory, config.state_dir / SECRETS_FILE),
        push_call=lambda address, method, params, timeout: targets.call(
            address, method, params, timeout=timeout
        ),
    )

    def register(request: EnrolRequest, issued: Issued) -> dict[str, Any]:
        now = time.time()
        with inventory.transaction():
            inventory.add_certificate(
                issued.serial, request.name, request.kind, now, issued.not_after
            )
            return service.register(request.name, request.kind, request.facts)

    def event(severity: str, subject: str, message: str) -> None:
        inventory.add_event(severity, subject, "enrolment", message, time.time())
        log.warning("%s", message)

    enroller = Enroller(
        ca,
        passphrases,
        _der(cert),
        register=register,
        remember_csr=lambda fp, name: inventory.remember_csr(fp, name, time.time()),
        event=event,
    )
    endpoint = ConfigEndpoint(service, enroller, config.name)
    counters = ErrorCounters()
    ssl_context = enrolment_server_context(cert, key, ca.ca_path)
    server = await listen(
        lambda: start_server(
            endpoint.handle,
            config.host,
            config.port,
            ssl_context,
            counters=counters,
            max_body=MAX_BODY,
            allow_anonymous=True,
        ),
        config.host,
        config.port,
    )
    server.revoke(set(inventory.revoked_serials()))
    service.on_revoke = server.revoke
    bus = None
    if config.bus != "none":
        from appliance.config.dbus_service import serve_config1

        try:
            bus = serve_config1(
                service, asyncio.get_running_loop(), None if config.bus == "system" else config.bus
            )
        except Exception as exc:  # noqa: BLE001 - dbus-python raises DBusException or worse
            server.close()
            inventory.close()
            raise Unavailable(
                f"cannot serve org.secondsite.Config1 on D-Bus: {exc}",
                'check the D-Bus policy, or set dbus.bus = "none"',
            ) from None

    def status() -> str:
        s = service.summary()
        return (
            f"{s.machines} machines, {s.protected_machines} protected, "
            f"{s.open_alerts} alerts, {s.running_jobs} jobs"
        )

    log.info("serving on %s:%d (D-Bus: %s)", config.host, config.port, config.bus)
    try:
        await serve_until_stopped(
            notifier, f"Serving on {config.host}:{config.port}", status, [service.run()]
        )
    finally:
        notifier.stopping("Stopping")
        if bus is not None:
            bus.close()
        server.close()
        await server.wait_closed()
        inventory.close()
    log.info("stopped")
