"""tracefs tracker cost under random-write churn, and the freeze + barrier + thaw time.

Run (root): .venv/bin/python tests/bench/bench_tracefs.py [--rate MBPS] [--seconds S]
            [--mib SIZE] [--captures N]

A 1 GiB ext4 on a loop device; a separate writer process does random 4 KiB O_DIRECT
pwrites (one bio each, the worst case for events per byte) into a preallocated file at
`--rate` MB/s. This process runs only the tracker (its main thread sleeps), so its CPU
time over the interval is the tracker's: reported as a share of one core, with the
events parsed per second. Then, with the churn still running, once a second: a plain
drain (what the sender loop sends untagged: its size is the dirty bytes per second)
and `--lead` seconds later `capture_consistent` (FIFREEZE, marker-barrier drain,
O_DIRECT copy of the chunks dirtied since, FITHAW): the freeze duration p50/max and
the bytes copied.
Without root it prints a skip result. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.capture import Capture, capture_consistent  # noqa: E402
from agent.discovery import discover  # noqa: E402
from agent.trackers.tracefs import TracefsTracker  # noqa: E402

MIB = 1 << 20
WRITER = """
import mmap, os, random, sys, time
path, size, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096); buf.write(os.urandom(4096))
blocks, per_s = size // 4096, rate * 1e6 / 4096
start, n = time.monotonic(), 0
while True:
    os.pwrite(fd, buf, random.randrange(blocks) * 4096)
    n += 1
    ahead = n / per_s - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
"""


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(args.mib * MIB)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
        check=True,
    )
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mnt = work / "mnt"
    mnt.mkdir()
    writer: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["mount", device, str(mnt)], check=True)
        target = mnt / "churn"
        # Written up front: the churn overwrites allocated blocks, as a database does.
        subprocess.run(
            [
                "dd",
                "if=/dev/zero",
                f"of={target}",
                "bs=4M",
                f"count={args.mib // 8}",
                "oflag=direct",
                "status=none",
            ],
            check=True,
        )
        disk = next(d for d in discover() if str(d.path) == device)
        tracker = TracefsTracker(disk, chunk=args.chunk)
        tracker.start()
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        try:
            tracker.needs_resync()
            if args.rate > 0:
                writer = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        WRITER,
                        str(target),
                        str((args.mib // 2) * MIB),
                        str(args.rate),
                    ]
                )
            time.sleep(1.0)  # let the writer reach its rate
            tracker.drain()
            events0, cpu0, wall0 = tracker.stats().events, cpu_seconds(), time.monotonic()
            time.sleep(args.seconds)
            events1, cpu1, wall1 = tracker.stats().events, cpu_seconds(), time.monotonic()
            wall = wall1 - wall0
            freezes: list[float] = []
            copied: list[int] = []
            untagged: dict[str, int] = {}
            one_second = []
            for _ in range(args.captures):
                time.sleep(1.0 - args.lead)
                one_second.append(tracker.drain().count * tracker.chunk)
                # What the sender loop does: drain and send untagged, so the freeze
                # copies only what was written in the last `lead` seconds.
                time.sleep(args.lead)
                result = capture_consistent(tracker, fd, [mnt], timeout=1.0)
                if isinstance(result, Capture):
                    freezes.append(result.freeze_seconds)
                    copied.append(result.nbytes)
                else:
                    reason = result.reason.split(" of ")[0]
                    untagged[reason] = untagged.get(reason, 0) + 1
            stats = tracker.stats()
        finally:
            os.close(fd)
            tracker.stop()
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", device], check=True)
    return {
        "bench": "tracefs",
        "rate_mbps": args.rate,
        "events_per_s": round((events1 - events0) / wall),
        "tracker_cpu_share_of_one_core": round((cpu1 - cpu0) / wall, 4),
        "lost": stats.lost_counters + stats.lost_lines,
        "captures": len(freezes),
        "chunk": tracker.chunk,
        "dirty_mib_per_s": round(statistics.median(one_second) / MIB, 1) if one_second else None,
        "lead_s": args.lead,
        "untagged": untagged,
        "freeze_ms_p50": round(statistics.median(freezes) * 1000, 1) if freezes else None,
        "freeze_ms_max": round(max(freezes) * 1000, 1) if freezes else None,
        "copied_mib_p50": round(statistics.median(copied) / MIB, 1) if copied else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="churn in MB/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mib", type=int, default=1024, help="filesystem size")
    parser.add_argument("--captures", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=None,
                        help="tracking granularity (default: the agent's, 4 KiB)")  # fmt: skip
    parser.add_argument(
        "--lead", type=float, default=0.1, help="seconds between the last drain and the freeze"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"bench": "tracefs", "skipped": "needs root"}))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-tracefs-") as work:
        result = run(args, Path(work))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
