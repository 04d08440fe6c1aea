"""`secondsite-targetd`: the master target daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
from typing import Any

import uvloop

from appliance.daemon.cli import run_main
from appliance.daemon.enrolled import disk_space, server_reporting
from appliance.daemon.logs import setup_logging
from appliance.daemon.runner import (
    EXIT_STATUS,
    add_common_arguments,
    add_enrol_arguments,
    advertised,
    config_path,
    enrol_and_exit,
    listen,
    make_dirs,
    serve_until_stopped,
    tls_context,
)
from appliance.daemon.sdnotify import Notifier
from appliance.settings import describe
from appliance.target.config import DEFAULT_CONFIG, TARGET_SETTINGS, TargetConfig
from appliance.target.server import TargetService
from appliance.target.store import ReplicaStore, StoreSettings
from appliance.wire.connection import start_server
from appliance.wire.errors import ErrorCounters

PROG = "secondsite-targetd"
log = logging.getLogger("secondsite.targetd")

DESCRIPTION = """\
The Secondsite master target. It receives replicated changes from process servers
over TLS (mutual certificates from the configuration server's CA), applies them to
replica disks (monolithicFlat VMDKs in the datastore directory), keeps an undo journal
so that any recovery point inside the retention window can be rebuilt, and
acknowledges a change only once it is durable. After a crash the replicas are rolled
back to the last acknowledged state and senders resend the rest.
"""

EPILOG = f"""\
configuration file keys (TOML, [section] name = value):
{describe(TARGET_SETTINGS)}

files:
  {DEFAULT_CONFIG}   configuration (optional; defaults apply when absent)
  STATE/catalogue.db              recovery-point catalogue (SQLite, WAL)
  STATE/journal/DISK/             undo journal segments
  DATASTORE/DISK/DISK.vmdk        replica disks (descriptor + -flat.vmdk)

{EXIT_STATUS}

Under systemd (Type=notify) it sends READY=1 once serving, STATUS= lines with the
number of disks and connections, and WATCHDOG=1 when WatchdogSec= is set.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument("--datastore", metavar="DIR", help="overrides storage.datastore")
    add_enrol_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    config = TargetConfig.load(
        config_path(args.config, DEFAULT_CONFIG),
        {
            "server.state_dir": args.state_dir,
            "server.listen": args.listen,
            "storage.datastore": args.datastore,
        },
    )
    if args.check_config:
        json.dump(config.as_dict(), sys.stdout, indent=2)
        print()
        return 0
    if args.enroll:
        facts = {"address": advertised(args.advertise, config.host, config.port)}
        return enrol_and_exit(args, config.state_dir, config.name, "target", facts)
    ssl_context = tls_context(config.tls_cert, config.tls_key, config.tls_ca)
    make_dirs(config.state_dir, config.datastore)
    uvloop.run(serve(config, ssl_context))
    return 0


async def serve(
    config: TargetConfig, ssl_context: ssl.SSLContext, notifier: Notifier | None = None
) -> None:
    notifier = notifier or Notifier()
    store = ReplicaStore(
        config.state_dir,
        config.datastore,
        StoreSettings(
            journal_level=config.journal_level,
            segment_bytes=config.segment_bytes,
            batch_bytes=config.batch_bytes,
            retention_seconds=config.retention_seconds,
            retention_bytes=config.retention_bytes,
        ),
    )
    counters = ErrorCounters()
    service = TargetService(
        store,
        name=config.name,
        datastore=config.datastore,
        window_bytes=config.window_bytes,
        checkpoint_seconds=config.checkpoint_seconds,
        counters=counters,
    )
    try:
        server = await listen(
            lambda: start_server(
                service.handle, config.host, config.port, ssl_context, counters=counters
            ),
            config.host,
            config.port,
        )
    except BaseException:
        store.close()
        raise
    background = []

    async def report() -> dict[str, Any]:
        newest = await asyncio.to_thread(store.newest_points)
        return {
            "machines": {
                m: {"tag_id": tag, "time": t / 1e9, "kind": kind,
                    "newest_app_time": None if app is None else app / 1e9}
                for m, (tag, t, kind, app) in newest.items()
            },
            "connections": service.connections,
            "disks": len(service.status()["disks"]),
            **disk_space(config.datastore),
        }  # fmt: skip

    background.extend(server_reporting(config.state_dir, "target", report, server))
    if config.prune_seconds:
        background.append(_prune_loop(store, config.prune_seconds))

    def status() -> str:
        summary = service.status()
        return f"{len(summary['disks'])} disks, {summary['connections']} connections"

    log.info("serving on %s:%d, datastore %s", config.host, config.port, config.datastore)
    await serve_until_stopped(
        notifier, f"Serving on {config.host}:{config.port}", status, background
    )
    log.info("stopping: making received changes durable")
    notifier.stopping("Making received changes durable")
    server.close()
    await service.shutdown()
    store.close()
    log.info("stopped")


async def _prune_loop(store: ReplicaStore, every: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        report = await loop.run_in_executor(None, store.prune)
        if report.points_removed:
            log.info("retention: %s", report)
