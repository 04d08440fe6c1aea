"""End to end into a real secondsite-targetd: TLS stream in, durable ACKs out.

Streams 1 MiB extents at random offsets of a 2 GiB replica (tags every 64 MiB) from a
StreamSender in this process to a targetd subprocess, until every byte is acknowledged
(= durable), and measures MB/s and the daemon's peak RSS (VmHWM). Baseline in the same
run: os.pwrite of the same extents into a plain file plus a final fdatasync.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.wire.messages import Data, Encoding, Tag, TagKind
from appliance.wire.sender import StreamSender
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon, TargetDaemon
from tests.pki import Authority

MIB = 1024 * 1024
DISK_SIZE = 2048 * MIB
TOTAL = int(os.environ.get("BENCH_TARGETD_MIB", "1024")) * MIB
EXTENT = MIB
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def extents(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, DISK_SIZE // EXTENT) * EXTENT for _ in range(TOTAL // EXTENT)]


def payloads(seed: int, n: int = 16) -> list[bytes]:
    rng = random.Random(seed)
    # Semi-compressible: half random, half repeated text.
    return [
        rng.randbytes(EXTENT // 2)
        + b"secondsite block " * (EXTENT // 34)
        + bytes(EXTENT // 2 - (EXTENT // 34) * 17)
        for _ in range(n)
    ]


def plain(path: Path, offsets: list[int], data: list[bytes]) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, DISK_SIZE)
        start = time.perf_counter()
        for i, off in enumerate(offsets):
            os.pwrite(fd, data[i % len(data)], off)
        os.fdatasync(fd)
        return TOTAL / MIB / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


async def stream(
    daemon: RoleDaemon, tls: TlsMaterial, disk: str, offsets: list[int], data: list[bytes]
) -> float:
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    sender = StreamSender("127.0.0.1", daemon.port, ctx, name="bench")
    sender.add_disk(disk, "bench-machine", DISK_SIZE)
    await sender.start()
    start = time.perf_counter()
    seq = 0
    for i, off in enumerate(offsets):
        seq += 1
        await sender.submit(Data(disk, seq, off, EXTENT, Encoding.RAW, data[i % len(data)]))
        if (i + 1) % 64 == 0:
            seq += 1
            await sender.submit(Tag(disk, seq, f"tag{seq}", TagKind.CRASH, time.time_ns()))
    await sender.wait_acked(disk, seq, timeout=600)
    elapsed = time.perf_counter() - start
    await sender.close()
    return TOTAL / MIB / elapsed


def vm_hwm(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-targetd-", dir="/var/tmp"))
    ca = Authority.create(base / "pki")
    tls = TlsMaterial(
        ca, ca.issue("target.bench"), ca.issue("process.bench"), ca, ca.issue("x"), ca.issue("y")
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = base / "target"
    state.mkdir()
    daemon = TargetDaemon(state, port, tls, extra_config=os.environ.get("BENCH_TARGETD_CONFIG", ""))
    daemon.start()
    data = payloads(7)
    ours, theirs = [], []
    try:
        for run in range(RUNS):
            offsets = extents(run)
            theirs.append(plain(base / "plain.img", offsets, data))
            ours.append(uvloop.run(stream(daemon, tls, f"disk{run}", offsets, data)))
            print(
                f"run {run}: targetd {ours[-1]:.0f} MiB/s, plain pwrite {theirs[-1]:.0f} MiB/s",
                flush=True,
            )
        assert daemon.process is not None
        rss = vm_hwm(daemon.process.pid)
    finally:
        daemon.stop()
        for p in sorted(base.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        base.rmdir()
    result = {
        "bench": "targetd",
        "targetd_mib_s": round(statistics.median(ours), 1),
        "plain_pwrite_mib_s": round(statistics.median(theirs), 1),
        "ratio": round(statistics.median(o / t for o, t in zip(ours, theirs, strict=True)), 3),
        "targetd_rss_peak_mib": round(rss, 1),
        "runs": RUNS,
        "mib_per_run": TOTAL // MIB,
    }
    print(
        f"median: targetd {result['targetd_mib_s']} MiB/s = {result['ratio']:.2f} of plain "
        f"pwrite; targetd peak RSS {result['targetd_rss_peak_mib']} MiB (target < 150)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
