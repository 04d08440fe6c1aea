"""From "failover" to "VM powered on" for a 2 GiB replica disk against vcsim (issue 6).

A real secondsite-targetd whose datastore directory is vcsim's LocalDS_0 (as in
tests/config/test_failover.py), fed by this process through a StreamSender: 1 GiB of
random data in every other 1 MiB extent of a 2 GiB disk, tagged ``old``, then the same
1 GiB overwritten, tagged ``latest``. So going back to ``old`` undoes 1 GiB of journal.
The jobs run on a real JobEngine and Inventory, reaching the target through
TargetClient and vcsim through VCenterStore, as configd does.

Measured, from submit to the job finishing (the last vSphere call is the power-on):
test failover to ``latest`` and to ``old``, BENCH_RUNS times each (median; each cleaned
up after), then failover to ``latest`` (cancelled after) and to ``old``, once each.
Each job's step times come from the engine's progress signals: the materialise part
(test failover's ``materialize`` or failover's ``rollback``) and the vSphere part
(``network``, ``vm``, ``power-on``) are reported apart. Every result is checked: the
copy (or the rolled-back replica) hashes to the point's image.

Baseline in the same run: ``cp --sparse=always`` of the replica's 2 GiB flat file plus
an fdatasync of the copy, and a plain sequential read+write of it (1 MiB at a time,
holes included), so the materialise figure has a ratio. Target: the latest point's
test failover under 10 s in total. The last line printed is one JSON object.

Caveats: vcsim answers in milliseconds where a real vCenter takes seconds per task, so
the vSphere part is a floor; the journal and the replica were just written, so they are
read from the page cache (as they would be for a recent point).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.config import failover  # noqa: E402
from appliance.config.api import JobProgress, Signal  # noqa: E402
from appliance.config.inventory import Inventory  # noqa: E402
from appliance.config.jobs import JobEngine  # noqa: E402
from appliance.config.model import JobKind, JobState  # noqa: E402
from appliance.config.targets import TargetClient  # noqa: E402
from appliance.config.vcenters import Credentials, VCenterStore  # noqa: E402
from appliance.vsphere.inventory import Inventory as VInventory  # noqa: E402
from appliance.vsphere.inventory import PowerState, discover  # noqa: E402
from appliance.vsphere.session import Endpoint, connect  # noqa: E402
from appliance.wire.messages import Data, Encoding, Tag, TagKind  # noqa: E402
from appliance.wire.sender import StreamSender  # noqa: E402
from appliance.wire.tls import client_context  # noqa: E402
from tests.conftest import TlsMaterial, free_port  # noqa: E402
from tests.integration.daemons import RoleDaemon, TargetDaemon  # noqa: E402
from tests.pki import Authority  # noqa: E402
from tests.vcsim.fixture import Vcsim, ensure_built  # noqa: E402

MIB = 1 << 20
DISK_SIZE = 2048 * MIB
EXTENT = MIB
MACHINE = "bench01"
DISK_ID = f"{MACHINE}-d0"
TARGET_S = 10.0  # issue 6: the latest point, failover to powered on
RUNS = int(os.environ.get("BENCH_RUNS", "3"))  # test failovers of each point
VSPHERE_STEPS = ("network", "vm", "power-on")
MATERIALISE_STEPS = ("materialize", "rollback")


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


# -- the replica: streamed through the target, its image at each tag hashed here -----


async def feed(target: RoleDaemon, tls: TlsMaterial) -> dict[str, Any]:
    """Stream both generations; returns each tag's sha256 and the streaming rate."""
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    sender = StreamSender("127.0.0.1", target.port, ctx, name="bench-failover")
    sender.add_disk(DISK_ID, MACHINE, DISK_SIZE)
    await sender.start()
    hashes: dict[str, str] = {}
    seq = 0
    zeros = bytes(EXTENT)
    started = time.perf_counter()
    try:
        for tag in ("old", "latest"):
            # Extents in order so the image hashes as it goes; odd extents stay holes.
            image = hashlib.sha256()
            for index in range(DISK_SIZE // EXTENT):
                if index % 2:
                    image.update(zeros)
                    continue
                payload = os.urandom(EXTENT)
                image.update(payload)
                seq += 1
                await sender.submit(
                    Data(DISK_ID, seq, index * EXTENT, EXTENT, Encoding.RAW, payload)
                )
            seq += 1
            await sender.submit(Tag(DISK_ID, seq, tag, TagKind.CRASH, time.time_ns()))
            hashes[tag] = image.hexdigest()
        await sender.wait_acked(DISK_ID, seq, timeout=600)
    finally:
        await sender.close()
    elapsed = time.perf_counter() - started
    sent = DISK_SIZE  # two generations of 1 GiB each
    return {"hashes": hashes, "stream_s": elapsed, "stream_mib_s": sent / MIB / elapsed}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


# -- baselines -----------------------------------------------------------------------


def baseline_cp(flat: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", str(flat), str(out)], check=True, timeout=300)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    took = time.perf_counter() - started
    out.unlink()
    return took


def baseline_read_write(flat: Path, out: Path) -> float:
    started = time.perf_counter()
    src = os.open(flat, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while chunk := os.read(src, MIB):
            os.write(dst, chunk)
        os.fdatasync(dst)
    finally:
        os.close(src)
        os.close(dst)
    took = time.perf_counter() - started
    out.unlink()
    return took


# -- the jobs ------------------------------------------------------------------------


@dataclass
class Clock:
    """Progress signals as (monotonic time, step) per job: the steps' own times."""

    marks: dict[str, list[tuple[float, str]]] = field(default_factory=dict)

    def __call__(self, signal: Signal) -> None:
        if isinstance(signal, JobProgress):
            marks = self.marks.setdefault(signal.job, [])
            if not marks or marks[-1][1] != signal.step:
                marks.append((time.monotonic(), signal.step))

    def steps(self, job_id: str) -> dict[str, float]:
        """Seconds per step of a finished job (its last mark is the finish)."""
        marks = self.marks.get(job_id, [])
        return {step: round(marks[i + 1][0] - t, 3) for i, (t, step) in enumerate(marks[:-1])}


class TimedOps(failover.ServiceOps):
    """The real ops; each target RPC's wall time is kept by method."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rpc: dict[str, float] = {}

    async def target_call(
        self, address: str, method: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        started = time.perf_counter()
        try:
            return await super().target_call(address, method, params, timeout=timeout)
        finally:
            self.rpc[method] = self.rpc.get(method, 0.0) + time.perf_counter() - started


@dataclass
class Bench:
    inv: Inventory
    ops: TimedOps
    clock: Clock
    engine: JobEngine

    async def run(self, kind: JobKind, params: dict[str, Any]) -> tuple[dict[str, Any], float]:
        self.ops.rpc = {}
        started = time.monotonic()
        job_id = self.engine.submit(kind, MACHINE, params)
        async with asyncio.timeout(300):
            while (job := self.inv.job(job_id))["finished_at"] is None:
                await asyncio.sleep(0.01)
        took = time.monotonic() - started
        if job["state"] != JobState.SUCCEEDED:
            raise RuntimeError(f"{kind} {params}: {job['state']} at {job['step']}: {job['error']}")
        return job, took

    async def measure(
        self, kind: JobKind, point: str, check: Callable[[Any], str]
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"point": point}
        if kind is JobKind.FAILOVER:
            params["mode"] = failover.FailoverMode.UNPLANNED.value
        job, took = await self.run(kind, params)
        steps = self.clock.steps(job["id"])
        line = {
            "job": kind.value,
            "point": point,
            "total_s": round(took, 3),
            "materialise_s": round(sum(steps.get(s, 0.0) for s in MATERIALISE_STEPS), 3),
            "vsphere_s": round(sum(steps.get(s, 0.0) for s in VSPHERE_STEPS), 3),
            "steps_s": steps,
            "target_rpc_s": {k: round(v, 3) for k, v in self.ops.rpc.items()},
            "image_ok": check(job) == "ok",
        }
        emit(line)
        return line


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' medians of each figure; image_ok only if every run's image was right."""
    figures = ("total_s", "materialise_s", "vsphere_s")
    return {
        **{k: round(statistics.median(r[k] for r in runs), 3) for k in figures},
        "image_ok": all(r["image_ok"] for r in runs),
        "runs": len(runs),
    }


def settings_for(inv: VInventory, target_dir: Path) -> dict[str, Any]:
    cluster = inv.clusters[0]
    # One host: vcsim adds a standard port group to a cluster's first host only.
    host = min((h for h in inv.hosts if h.cluster == cluster.name), key=lambda h: h.moid)
    return {
        "vcenter": "vc", "datacenter": inv.datacenters[0].name, "datastore": "LocalDS_0",
        "target_dir": str(target_dir), "folder": inv.datacenters[0].vm_folder,
        "resource_pool": cluster.resource_pool, "host": host.moid, "nics": ["eth0"],
        "network_map": {"eth0": "VM Network"}, "cpus": 2, "memory_mib": 2048,
        "firmware": "efi", "guest_id": "debian11_64Guest",
    }  # fmt: skip


async def jobs(
    sim: Vcsim, target: RoleDaemon, tls: TlsMaterial, base: Path, datastore: Path, *,
    hashes: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    endpoint = Endpoint(host=sim.host, port=sim.port, user=sim.user, password=sim.password,
                        thumbprint=sim.cert_sha256, timeout=30.0)  # fmt: skip

    def vm_on(name: str) -> bool:
        with connect(endpoint) as session:
            vm = discover(session).vm(name)
        return vm is not None and vm.power_state is PowerState.ON

    with connect(endpoint) as session:
        vinv = discover(session)
    inv = Inventory.open(base / "inventory.db")
    inv.add_site("dr", "secondary")
    inv.upsert_server("mt1", "target", f"127.0.0.1:{target.port}")
    vcenters = VCenterStore(inv, base / "vcenters.json", timeout=30)
    vcenters.register(
        "vc", "dr", f"{sim.host}:{sim.port}", Credentials(sim.user, sim.password), sim.cert_sha256
    )
    client = TargetClient(
        tls.client.cert, tls.client.key, tls.ca.cert, name="bench-failover", timeout=300
    )
    ops = TimedOps(client.call, vcenters, lambda machine: False)
    inv.add_machine(MACHINE, MACHINE, now=time.time())
    inv.update_machine(MACHINE, master_target="mt1", replica=settings_for(vinv, datastore),
                       protection_enabled=True)  # fmt: skip
    clock = Clock()
    engine = JobEngine(inv, failover.definitions(ops), clock, time.time)
    bench = Bench(inv, ops, clock, engine)
    replica = datastore / DISK_ID / f"{DISK_ID}-flat.vmdk"
    results: dict[str, Any] = {}
    try:
        for point in ("latest", "old"):

            def copy_ok(job: Any, point: str = point) -> str:
                rel = job["result"]["disks"][0].split("] ", 1)[1]
                flat = datastore / rel.replace(".vmdk", "-flat.vmdk")
                good = vm_on(f"{MACHINE}-test") and sha256_file(flat) == hashes[point]
                return "ok" if good else "wrong"

            runs = []
            for _ in range(RUNS):  # a drill leaves the replica as it was: repeat it
                runs.append(await bench.measure(JobKind.TEST_FAILOVER, point, copy_ok))
                await bench.run(JobKind.CLEANUP, {})
            results[f"test_failover_{point}"] = median(runs)
        for point in ("latest", "old"):

            def rolled_ok(job: Any, point: str = point) -> str:
                good = vm_on(MACHINE) and sha256_file(replica) == hashes[point]
                return "ok" if good else "wrong"

            # Once each: rolling back to "old" drops the journal after it.
            results[f"failover_{point}"] = await bench.measure(JobKind.FAILOVER, point, rolled_ok)
            await bench.run(JobKind.CANCEL, {})
    finally:
        await engine.close()
        inv.close()
    return results


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-failover-", dir="/var/tmp"))
    sim = Vcsim(ensure_built(), log_dir=base / "vcsim")
    target: RoleDaemon | None = None
    try:
        ca = Authority.create(base / "pki")
        tls = TlsMaterial(ca, ca.issue("target.bench"), ca.issue("configd.bench"), ca,
                          ca.issue("x"), ca.issue("y"))  # fmt: skip
        sim.start(user="bench@vsphere.local", password="bench-pass", timeout=60)
        datastore = sim.datastore_dir("LocalDS_0")
        state = base / "target"
        state.mkdir()
        target = TargetDaemon(state, free_port(), tls,
                              extra_config=f'[storage]\ndatastore = "{datastore}"\n')  # fmt: skip
        target.start()
        fed = asyncio.run(feed(target, tls))
        emit({"stream_s": round(fed["stream_s"], 1), "stream_mib_s": round(fed["stream_mib_s"]),
              "disk_gib": DISK_SIZE / (1 << 30), "data_gib": 1, "changes_gib": 1})  # fmt: skip
        flat = datastore / DISK_ID / f"{DISK_ID}-flat.vmdk"
        cp_s = baseline_cp(flat, base / "cp.img")
        rw_s = baseline_read_write(flat, base / "rw.img")
        emit({"baseline_cp_sparse_s": round(cp_s, 3), "baseline_read_write_s": round(rw_s, 3)})
        results = asyncio.run(jobs(sim, target, tls, base, datastore, hashes=fed["hashes"]))
    finally:
        if target is not None:
            target.stop()
        sim.stop()
        shutil.rmtree(base, ignore_errors=True)
    latest = results["test_failover_latest"]
    old = results["test_failover_old"]
    summary = {
        "bench": "failover",
        "disk_gib": DISK_SIZE / (1 << 30),
        **{f"{name}_s": r["total_s"] for name, r in results.items()},
        **{f"{name}_materialise_s": r["materialise_s"] for name, r in results.items()},
        **{f"{name}_vsphere_s": r["vsphere_s"] for name, r in results.items()},
        "baseline_cp_sparse_s": round(cp_s, 3),
        "baseline_read_write_s": round(rw_s, 3),
        "materialise_latest_over_cp": round(latest["materialise_s"] / cp_s, 2),
        "materialise_old_over_cp": round(old["materialise_s"] / cp_s, 2),
        "rollback_old_over_cp": round(results["failover_old"]["materialise_s"] / cp_s, 2),
        "images_ok": all(r["image_ok"] for r in results.values()),
        "target_s": TARGET_S,
        "target_met": latest["total_s"] < TARGET_S,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
