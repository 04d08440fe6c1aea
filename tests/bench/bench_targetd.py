"""End to end into a real secondsite-targetd: TLS stream in, durable ACKs out.

Streams 1 MiB extents at random offsets of a 2 GiB replica (tags every 64 MiB) from a
StreamSender in this process to a targetd subprocess, until every byte is acknowledged
(= durable), and measures MB/s and the daemon's peak RSS (VmHWM). Baseline in the same
run: os.pwrite of the same extents into a plain file plus a final fdatasync.

Then small extents (issue 4: a 1 % random 4 KiB delta): onto one replica filled first
(so every change journals real old contents), 20 MiB of random 4 KiB extents sent as
5120 DATA frames, then the same bytes as EXTENTS messages of ~1 MiB (256 extents), each
followed by a tag, timed from the first frame to the tag's ACK (the recovery point);
alternating, median of 3 each, and their ratio.

    BENCH_TARGETD_PARTS=small .venv/bin/python tests/bench/bench_targetd.py

BENCH_TARGETD_PARTS picks "big", "small" or both (the default: "big,small").
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

from appliance.wire.messages import Data, Encoding, Extent, Extents, Tag, TagKind
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
PARTS = os.environ.get("BENCH_TARGETD_PARTS", "big,small").split(",")
BLOCK = 4096
SMALL_TOTAL = 20 * MIB  # 5120 blocks: 1 % of a 2 GiB disk
PER_MESSAGE = 256  # 4 KiB extents per EXTENTS: ~1 MiB


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


async def small_extents(
    daemon: RoleDaemon, tls: TlsMaterial, data: list[bytes], runs: int
) -> tuple[list[float], list[float]]:
    """Seconds per 20 MiB of random 4 KiB extents as DATA and as EXTENTS, alternating,
    on one replica filled beforehand (1 MiB DATA frames)."""
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    disk = "small"
    sender = StreamSender("127.0.0.1", daemon.port, ctx, name="bench-small")
    sender.add_disk(disk, "bench-machine", DISK_SIZE)
    await sender.start()
    seq = 0
    for i, off in enumerate(range(0, DISK_SIZE, EXTENT)):
        seq += 1
        await sender.submit(Data(disk, seq, off, EXTENT, Encoding.RAW, data[i % len(data)]))
    seq += 1
    await sender.submit(Tag(disk, seq, "filled", TagKind.CRASH, time.time_ns()))
    await sender.wait_acked(disk, seq, timeout=600)
    rng = random.Random(4)
    # Random, text and zero-run blocks, as the big extents hold them.
    blocks = [data[i % len(data)][i * 12288 : i * 12288 + BLOCK] for i in range(64)]
    as_data, as_extents = [], []
    for _ in range(runs):
        for timings in (as_data, as_extents):
            offsets = sorted(rng.sample(range(DISK_SIZE // BLOCK), SMALL_TOTAL // BLOCK))
            start = time.perf_counter()
            if timings is as_data:
                for i, block in enumerate(offsets):
                    seq += 1
                    payload = blocks[i % len(blocks)]
                    await sender.submit(
                        Data(disk, seq, block * BLOCK, BLOCK, Encoding.RAW, payload)
                    )
            else:
                for first in range(0, len(offsets), PER_MESSAGE):
                    part = offsets[first : first + PER_MESSAGE]
                    extents = [Extent(b * BLOCK, BLOCK, Encoding.RAW) for b in part]
                    payload = b"".join(blocks[(first + i) % len(blocks)] for i in range(len(part)))
                    seq += 1
                    await sender.submit(Extents.of(disk, seq, extents, payload))
            seq += 1
            await sender.submit(Tag(disk, seq, f"s{seq}", TagKind.CRASH, time.time_ns()))
            await sender.wait_acked(disk, seq, timeout=600)
            timings.append(time.perf_counter() - start)
    await sender.close()
    return as_data, as_extents


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
    ours: list[float] = []
    theirs: list[float] = []
    as_data: list[float] = []
    as_extents: list[float] = []
    try:
        for run in range(RUNS if "big" in PARTS else 0):
            offsets = extents(run)
            theirs.append(plain(base / "plain.img", offsets, data))
            ours.append(uvloop.run(stream(daemon, tls, f"disk{run}", offsets, data)))
            print(
                f"run {run}: targetd {ours[-1]:.0f} MiB/s, plain pwrite {theirs[-1]:.0f} MiB/s",
                flush=True,
            )
        assert daemon.process is not None
        rss = vm_hwm(daemon.process.pid)  # the big extents' peak (what the target is for)
        if "small" in PARTS:
            as_data, as_extents = uvloop.run(small_extents(daemon, tls, data, RUNS))
            for i, (d, e) in enumerate(zip(as_data, as_extents, strict=True)):
                print(
                    f"small run {i}: 5120 DATA {d * 1000:.0f} ms, "
                    f"{SMALL_TOTAL // BLOCK // PER_MESSAGE} EXTENTS {e * 1000:.0f} ms",
                    flush=True,
                )
        rss_all = vm_hwm(daemon.process.pid)  # a fourth disk, filled: more threads and maps
    finally:
        daemon.stop()
        for p in sorted(base.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        base.rmdir()
    result: dict[str, object] = {"bench": "targetd", "runs": RUNS}
    if ours:
        result |= {
            "targetd_mib_s": round(statistics.median(ours), 1),
            "plain_pwrite_mib_s": round(statistics.median(theirs), 1),
            "ratio": round(statistics.median(o / t for o, t in zip(ours, theirs, strict=True)), 3),
            "mib_per_run": TOTAL // MIB,
        }
        print(
            f"median: targetd {result['targetd_mib_s']} MiB/s = {result['ratio']:.2f} of plain "
            f"pwrite"
        )
    if as_data:
        data_s, extents_s = statistics.median(as_data), statistics.median(as_extents)
        result |= {
            "small_data_ms": round(data_s * 1000, 1),
            "small_extents_ms": round(extents_s * 1000, 1),
            "small_speedup": round(data_s / extents_s, 2),
            "small_extents_per_message": PER_MESSAGE,
            "small_mib": SMALL_TOTAL // MIB,
        }
        print(
            f"median: 20 MiB of random 4 KiB extents to a recovery point: 5120 DATA "
            f"{result['small_data_ms']} ms, EXTENTS {result['small_extents_ms']} ms "
            f"({result['small_speedup']}x)"
        )
    result["targetd_rss_peak_mib"] = round(rss, 1)
    result["targetd_rss_peak_all_mib"] = round(rss_all, 1)
    print(
        f"targetd peak RSS {result['targetd_rss_peak_mib']} MiB (target < 150; "
        f"{result['targetd_rss_peak_all_mib']} MiB after the small extents too)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
