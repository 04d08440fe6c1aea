"""The configuration server at 1,000 machines x 4 disks (issue 5's performance targets).

A real `secondsite-configd` on a private D-Bus, its inventory filled beforehand with
1,000 protected machines of 4 disks each (and their agents' certificates).

1. `secondsitectl status --json` end to end (a fresh process each time), median of 7,
   against the baseline of the same interpreter starting and importing secondsitectl
   with `--help` (what any command costs before it says a word). Target: < 300 ms.
2. Heartbeats: 1,000 agent connections (TLS, one certificate each, from this process)
   each reporting its 4 disks every 10 s for 40 s; configd's CPU over that window as
   a share of one core (from /proc/PID/stat). Target: < 10 %.
The last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from cryptography import x509

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.config.ca import CertificateAuthority  # noqa: E402
from appliance.config.inventory import Inventory  # noqa: E402
from appliance.config.model import ComponentKind, MachineState  # noqa: E402
from appliance.lab.bus import start_private_bus  # noqa: E402
from appliance.wire.heartbeat import Reporter  # noqa: E402
from appliance.wire.tls import client_context, serial_hex  # noqa: E402
from tests.conftest import TlsMaterial, free_port  # noqa: E402
from tests.integration.daemons import RoleDaemon  # noqa: E402

MACHINES = 1000
DISKS = 4
INTERVAL = 10.0
WINDOW = 40.0
POLICY = ROOT / "units" / "dbus-1" / "system.d" / "org.secondsite.Config1.conf"


def fill(state: Path) -> list[tuple[str, Path, Path]]:
    """The inventory and one agent certificate per machine: (name, cert, key)."""
    ca = CertificateAuthority.open_or_create(state / "ca")
    inv = Inventory.open(state / "inventory.db")
    now = time.time()
    inv.upsert_server("ps1", "process", "127.0.0.1:9441", target="127.0.0.1:9442", now=now)
    inv.upsert_server("mt1", "target", "127.0.0.1:9442", now=now)
    agents = []
    certs = state / "agents"
    with inv.transaction():
        for i in range(MACHINES):
            name = f"m{i:04d}"
            inv.add_machine(name, name, now=now)
            inv.set_disks(name, [
                {"disk_id": f"{name}-sd{c}", "path": f"/dev/sd{c}", "size_bytes": 100 << 30,
                 "sector_size": 512} for c in "abcd"[:DISKS]
            ])  # fmt: skip
            inv.update_machine(name, process_server="ps1", master_target="mt1",
                               protection_enabled=True, replicating=True,
                               newest_point_time=now - random.uniform(1, 30))  # fmt: skip
            inv.set_machine_state(name, MachineState.PROTECTED, now)
    for i in range(MACHINES):
        name = f"m{i:04d}"
        cert, key = ca.issue_local(name, ComponentKind.AGENT, [], certs)
        serial = serial_hex(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number)
        inv.add_certificate(serial, name, ComponentKind.AGENT, now, now + 86400)
        agents.append((name, cert, key))
    inv.close()
    return agents


def timed(argv: list[str], env: dict[str, str], runs: int = 7) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def heartbeats(port: int, ca: Path, agents: list[tuple[str, Path, Path]], pid: int) -> dict:  # type: ignore[type-arg]
    answers = 0

    def answered(_: dict) -> None:  # type: ignore[type-arg]
        nonlocal answers
        answers += 1

    def report(name: str) -> dict:  # type: ignore[type-arg]
        return {
            "disks": [{"disk_id": f"{name}-sd{c}", "path": f"/dev/sd{c}",
                       "size_bytes": 100 << 30, "sector_size": 512, "initial_percent": 100.0,
                       "initial_done": True} for c in "abcd"[:DISKS]],
            "replicating": True, "resync_done": 0, "facts": {"hostname": name},
        }  # fmt: skip

    reporters = [
        Reporter(
            "127.0.0.1",
            port,
            client_context(cert, key, ca),
            name=name,
            role="agent",
            build=lambda n=name: report(n),
            on_answer=answered,
            interval=INTERVAL,
            server_hostname="localhost",
            timeout=60,
        )
        for name, cert, key in agents
    ]
    tasks = []
    for r in reporters:  # spread the first reports over one interval, like real agents
        tasks.append(asyncio.create_task(r.run()))
        await asyncio.sleep(INTERVAL / len(reporters))
    await asyncio.sleep(2)
    connected = sum(r.connected for r in reporters)
    before, answers_before, started = cpu_seconds(pid), answers, time.monotonic()
    await asyncio.sleep(WINDOW)
    cpu = cpu_seconds(pid) - before
    elapsed = time.monotonic() - started
    got = answers - answers_before
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "connected": connected,
        "reports_per_s": round(got / elapsed, 1),
        "configd_cpu_share": round(cpu / elapsed, 4),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-configd-") as tmp:
        tmp_path = Path(tmp)
        state = tmp_path / "configd"
        state.mkdir()
        agents = fill(state)
        bus = start_private_bus(tmp_path / "bus", (POLICY,))
        port = free_port()
        extra = (f'[dbus]\nbus = "{bus.address}"\n[reports]\ninterval = {INTERVAL}\n'
                 f'[health]\nagent_timeout = 60.0\nserver_timeout = 3600.0\n'
                 f'[protection]\nauto = false\n')  # fmt: skip
        configd = RoleDaemon(state, port, TlsMaterial.__new__(TlsMaterial), extra,
                             "appliance.config", static_tls=False)  # fmt: skip
        try:
            configd.start(timeout=60)
            env = {**os.environ, "SECONDSITE_BUS_ADDRESS": bus.address}
            ctl = [sys.executable, "-m", "appliance.ctl"]
            status = json.loads(subprocess.run([*ctl, "status", "--json"], env=env, check=True,
                                               capture_output=True, text=True).stdout)  # fmt: skip
            assert status["machines"]["total"] == MACHINES, status["machines"]
            baseline = timed([*ctl, "--help"], env)
            status_s = timed([*ctl, "status", "--json"], env)
            machines_s = timed([*ctl, "machines", "--json"], env, runs=3)
            print(json.dumps({"status_json_s": round(status_s, 3),
                              "startup_baseline_s": round(baseline, 3),
                              "machines_json_s": round(machines_s, 3)}), flush=True)  # fmt: skip
            assert configd.process is not None
            beat = uvloop.run(heartbeats(port, state / "ca" / "ca.crt", agents,
                                         configd.process.pid))  # fmt: skip
            print(json.dumps(beat), flush=True)
        finally:
            configd.stop()
            bus.stop()
    result = {
        "bench": "configd",
        "machines": MACHINES,
        "disks_per_machine": DISKS,
        "status_json_s": round(status_s, 3),
        "status_over_startup": round(status_s / baseline, 2),
        "status_target_met": status_s < 0.3,
        "machines_json_s": round(machines_s, 3),
        **beat,
        "heartbeat_target_met": beat["configd_cpu_share"] < 0.10,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
