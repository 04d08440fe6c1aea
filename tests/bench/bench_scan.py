"""Scan tracker speed: one full `drain()` of a loop device, against `dd iflag=direct`.

Run (root): .venv/bin/python tests/bench/bench_scan.py [--mib 512] [--runs 3]

A loop device over an image file filled with incompressible data (not sparse: holes
would read as free zero pages). Alternating, `runs` times each:
- scan: `ScanTracker.drain()` of an idle disk (O_DIRECT 4 MiB preads + xxh3_128 per
  64 KiB chunk + compare), i.e. the per-cycle cost of the scan tracker;
- dd: `dd if=DEV of=/dev/null bs=4M iflag=direct`, the same reads without hashing.
The image was just written, so the loop driver serves it from the page cache: this
measures the agent's CPU path, not a disk. Before each pair, one more drain runs with
the image dropped from the page cache (`scan_cold_mb_s`): then the host disk sets the
pace. The last line is one JSON object.
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

from agent.discovery import discover  # noqa: E402
from agent.trackers.scan import ScanTracker  # noqa: E402

MIB = 1 << 20


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print(json.dumps({"bench": "scan", "skipped": "needs root for a loop device"}))
        return 0
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        image = Path(tmp) / "disk.img"
        block = os.urandom(4 * MIB)
        with open(image, "wb") as f:
            for _ in range(args.mib // 4):
                f.write(block[:-1] + bytes([len(block) % 251]))  # no two chunks alike
                block = block[1:] + block[:1]
        device = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        try:
            disk = next(d for d in discover() if str(d.path) == device)
            tracker = ScanTracker(disk, Path(tmp) / "digests")
            started = time.monotonic()
            tracker.start()  # no digest file: scans everything into the baseline
            start_s = time.monotonic() - started
            scan, dd, cold = [], [], []
            os.sync()
            for _ in range(args.runs):
                # Cold: the backing file dropped from the page cache, so the loop driver
                # reads the host disk: what a scan of a real disk looks like.
                drop_cache(image)
                t0 = time.monotonic()
                assert not tracker.drain()
                cold.append(time.monotonic() - t0)
                t0, c0 = time.monotonic(), time.process_time()
                assert not tracker.drain()
                scan.append((time.monotonic() - t0, time.process_time() - c0))
                t0 = time.monotonic()
                subprocess.run(
                    ["dd", f"if={device}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"],
                    check=True,
                )
                dd.append(time.monotonic() - t0)
            tracker.stop()
        finally:
            subprocess.run(["losetup", "-d", device], check=True)
    scan_s = statistics.median(s for s, _ in scan)
    cpu_s = statistics.median(c for _, c in scan)
    dd_s = statistics.median(dd)
    result = {
        "bench": "scan",
        "mib": args.mib,
        "scan_mb_s": round(args.mib * MIB / scan_s / 1e6),
        "scan_cpu_s_per_gib": round(cpu_s * 1024 / args.mib, 3),
        "scan_cold_mb_s": round(args.mib * MIB / statistics.median(cold) / 1e6),
        "start_mb_s": round(args.mib * MIB / start_s / 1e6),
        "dd_direct_mb_s": round(args.mib * MIB / dd_s / 1e6),
        "ratio_scan_to_dd": round(dd_s / scan_s, 2),
    }
    print(
        f"scan {result['scan_mb_s']} MB/s (cold {result['scan_cold_mb_s']}), "
        f"dd {result['dd_direct_mb_s']} MB/s"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
