"""`secondsite-agent run`: replicate the configured disks until SIGTERM.

Startup checks (configuration, disks, tracker, TLS material) fail as one operator
line before READY; afterwards the replicator runs under the common serve loop and
STATE/status.json (`agent.status`) is rewritten atomically every second.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from agent.config import AgentConfig, TrackerChoice
from agent.discovery import Disk, disk_identity
from agent.errors import AgentError, TrackerUnavailable
from agent.managed import Controller
from agent.remote import stream_digests
from agent.replicator import AckRelay, Replicator
from agent.status import STATUS_FILE, progress_line, snapshot
from agent.trackers.base import Tracker
from agent.trackers.scan import ScanTracker
from agent.trackers.tracefs import TracefsTracker
from appliance.daemon.cli import ConfigError, OperatorError
from appliance.daemon.enrolled import Enrolled, reporter
from appliance.daemon.enrolled import load as load_enrolment
from appliance.daemon.runner import make_dirs, serve_until_stopped
from appliance.daemon.sdnotify import Notifier
from appliance.storage.atomic import atomic_write
from appliance.wire.connection import ConnectionState
from appliance.wire.sender import StreamSender
from appliance.wire.tls import client_context

log = logging.getLogger("secondsite.agent")
STATUS_INTERVAL = 1.0

TrackerFactory = Callable[[Disk], Tracker]


def choose_tracker(config: AgentConfig, disks: list[Disk]) -> TrackerFactory:
    """The tracker factory for these disks. tracefs is probed (started and stopped) on
    each disk; under `auto` the first failure switches all disks to scan, logged once
    with the reason, while an explicit `tracefs` that cannot run is an operator error."""
    scan_dir = config.state_dir / "scan"

    def scan(disk: Disk) -> Tracker:
        return ScanTracker(disk, scan_dir / f"{digest_file_stem(disk)}.digests")

    if config.tracker is TrackerChoice.SCAN:
        return scan
    for disk in disks:
        probe = TracefsTracker(disk)
        try:
            probe.start()
        except TrackerUnavailable as err:
            if config.tracker is TrackerChoice.TRACEFS:
                raise OperatorError(err.message, 'set agent.tracker = "scan" (or "auto")') from None
            log.warning("%s on %s; falling back to the scan tracker", err.message, disk.path)
            return scan
        probe.stop()
    return TracefsTracker


def digest_file_stem(disk: Disk) -> str:
    """The scan tracker's file follows the disk, not its kernel name: after two disks
    swap names, each would otherwise trust the other's digests (same major:minor, and
    the same size is common) and miss every chunk where the two disks happen to agree."""
    identity = disk_identity(disk)
    if not identity:
        return disk.name
    return f"{disk.name.rstrip('0123456789')}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def client_tls(config: AgentConfig) -> ssl.SSLContext:
    for what, file in (("certificate", config.tls_cert), ("key", config.tls_key),
                       ("CA certificate", config.tls_ca)):  # fmt: skip
        if not file.is_file():
            raise ConfigError(
                f"TLS {what} {file} does not exist", "set tls.cert, tls.key and tls.ca"
            )
    try:
        return client_context(config.tls_cert, config.tls_key, config.tls_ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the TLS material: {exc}") from None


def connection_error(sender: StreamSender) -> str | None:
    """Why the stream to the process server is down, in words an operator can act on
    (a refused certificate shows up as a TLS alert, or as a close before WELCOME)."""
    error = sender.last_error
    if error is None or sender.state is ConnectionState.OPEN:
        return None
    text = str(error) or type(error).__name__
    if sender.last_error_hint:  # closed before WELCOME: our certificate was refused
        text = f"{text} {sender.last_error_hint}"
    if isinstance(error, ssl.SSLError) or "certificate" in text.lower():
        return f"{text} (the process server refuses our certificate: revoked, or not from its CA?)"
    return text


def show_progress(status_path: Path) -> None:
    """On a terminal, the initial copy's progress redrawn in place on stderr (the log
    goes there too, so a log line simply scrolls it up); nothing once synced or when
    stderr is not a terminal (systemd, pipes)."""
    if not sys.stderr.isatty():
        return
    try:
        document = json.loads(status_path.read_bytes())
    except (OSError, ValueError):
        return
    line = progress_line(document, shutil.get_terminal_size().columns)
    if line is not None:
        sys.stderr.write("\r" + line + "\x1b[K")
        sys.stderr.flush()


def run(config: AgentConfig, disks: list[Disk]) -> int:
    make_dirs(config.state_dir, config.state_dir / "scan")
    ssl_context = client_tls(config)
    factory = choose_tracker(config, disks)
    if config.managed:
        enrolled = load_enrolment(config.state_dir)
        assert enrolled is not None  # AgentConfig.load checked that the file exists
        uvloop.run(serve_managed(config, disks, factory, ssl_context, enrolled))
    else:
        uvloop.run(serve(config, disks, factory, ssl_context))
    return 0


async def serve_managed(  # noqa: PLR0917 - mirrors serve()
    config: AgentConfig,
    disks: list[Disk],
    factory: TrackerFactory,
    ssl_context: ssl.SSLContext,
    enrolled: Enrolled,
    notifier: Notifier | None = None,
) -> None:
    """Report to the configuration server and protect what (and where) it says."""
    notifier = notifier or Notifier()
    controller = Controller(config, disks, factory, ssl_context)
    reports = reporter(enrolled, config.state_dir, "agent", build=controller.report,
                       on_answer=controller.apply)  # fmt: skip
    status_path = config.state_dir / STATUS_FILE

    def tag_now() -> None:
        if controller.session is not None:
            controller.session.replicator.request_tag()

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, tag_now)

    def write_status() -> None:
        session = controller.session
        if session is not None:
            document = snapshot(session.replicator, config.machine_id,
                                session.sender.state.value, session.address)  # fmt: skip
            document["connection_error"] = connection_error(session.sender)
        else:
            document = {"pid": os.getpid(), "time": time.time(),
                        "machine_id": config.machine_id, "phase": "not protected",
                        "connection": "none", "process_server": None, "disks": {}}  # fmt: skip
        document["config_server"] = {"address": enrolled.config_server,
                                     "connected": reports.connected,
                                     "error": reports.last_error}  # fmt: skip
        atomic_write(status_path, json.dumps(document, indent=1).encode() + b"\n")

    async def status_loop() -> None:
        while True:
            await asyncio.to_thread(write_status)
            if controller.failed is not None:
                signal.raise_signal(signal.SIGTERM)
                return
            show_progress(status_path)
            await asyncio.sleep(STATUS_INTERVAL)

    def summary() -> str:
        session = controller.session
        where = f"via {session.address}" if session else "not protected"
        state = "connected" if reports.connected else "unreachable"
        return (
            f"{session.replicator.phase if session else 'idle'} {where}; "
            f"configuration server {state}"
        )

    log.info("machine %s: enrolled with %s; waiting for its instructions",
             config.machine_id, enrolled.config_server)  # fmt: skip
    await serve_until_stopped(notifier, "Reporting to the configuration server", summary,
                              [reports.run(), status_loop()])  # fmt: skip
    notifier.stopping("Saving the replication state")
    await controller.close()
    await asyncio.to_thread(write_status)
    if controller.failed is not None:
        err = controller.failed
        if isinstance(err, AgentError):
            raise OperatorError(err.message, err.hint or None)
        raise err
    log.info("stopped")


async def serve(
    config: AgentConfig,
    disks: list[Disk],
    factory: TrackerFactory,
    ssl_context: ssl.SSLContext,
    notifier: Notifier | None = None,
) -> None:
    notifier = notifier or Notifier()
    acks = AckRelay()
    sender = StreamSender(
        config.process_host, config.process_port, ssl_context, name=config.machine_id,
        role="agent", server_hostname=config.tls_name, on_ack=acks,
    )  # fmt: skip
    rep = Replicator(
        disks, sender, factory, config.state_dir, machine_id=config.machine_id, acks=acks,
        tag_interval=config.tag_interval, freeze_timeout=config.freeze_timeout,
        app_interval=config.app_interval, pre_script=config.pre_script or None,
        post_script=config.post_script or None,
        remote_digests=stream_digests(sender, asyncio.get_running_loop()),
    )  # fmt: skip
    status_path = config.state_dir / STATUS_FILE
    failed: list[BaseException] = []

    def write_status() -> None:
        document = snapshot(rep, config.machine_id, sender.state.value,
                            f"{config.process_host}:{config.process_port}")  # fmt: skip
        document["connection_error"] = connection_error(sender)
        atomic_write(status_path, json.dumps(document, indent=1).encode() + b"\n")

    async def status_loop() -> None:
        while True:
            await asyncio.to_thread(write_status)
            show_progress(status_path)
            await asyncio.sleep(STATUS_INTERVAL)

    async def watch() -> None:
        try:
            await rep.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised after the shutdown below
            failed.append(exc)
            signal.raise_signal(signal.SIGTERM)

    def summary() -> str:
        parts = []
        for disk_id, s in rep.status().items():
            init = s["initial"]
            state = "synced" if init["done"] else f"initial {init['percent']:.0f}%"
            parts.append(f"{disk_id} {state}, {s['tags']} tags")
        return f"{rep.phase}: " + "; ".join(parts)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, rep.request_tag)
    await sender.start()
    await rep.start()
    log.info(
        "machine %s: protecting %s with the %s tracker via %s:%d",
        config.machine_id, ", ".join(str(d.path) for d in disks),
        "tracefs" if factory is TracefsTracker else "scan",
        config.process_host, config.process_port,
    )  # fmt: skip
    started = time.monotonic()
    await serve_until_stopped(notifier, f"Replicating {len(disks)} disks", summary,
                              [status_loop(), watch()])  # fmt: skip
    log.info("stopping after %.0f s: saving the replication state", time.monotonic() - started)
    notifier.stopping("Saving the replication state")
    await rep.stop()
    await sender.close()
    await asyncio.to_thread(write_status)
    if failed:
        err = failed[0]
        if isinstance(err, AgentError):
            raise OperatorError(err.message, err.hint or None)
        raise err
    log.info("stopped")
