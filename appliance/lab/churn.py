"""The churn generator: overwrites files in the given directories at about RATE MB/s,
fsyncing each write, within a bounded working set (it never fills the filesystem).

python -m appliance.lab.churn --rate MBPS DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time
from pathlib import Path

BLOCK = 1 << 20  # one write (and fsync) per MiB


def main() -> int:
    parser = argparse.ArgumentParser(prog="secondsite-lab-churn")
    parser.add_argument("--rate", type=float, required=True, help="MB/s over all directories")
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args()
    running = True

    def halt(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, halt)
    signal.signal(signal.SIGINT, halt)
    slots: list[tuple[Path, int]] = []  # (file, MiB blocks in it)
    for d in args.dirs:
        work = d / "churn"
        work.mkdir(exist_ok=True)
        st = os.statvfs(d)
        budget = max(1, int(st.f_bavail * st.f_frsize * 0.3) // BLOCK)  # MiB of working set
        files = max(1, min(16, budget))
        slots += [(work / f"churn{i:02d}.bin", max(1, budget // files)) for i in range(files)]
    rng = random.Random()
    interval = BLOCK / (args.rate * 1e6)
    next_at = time.monotonic()
    while running:
        path, blocks = rng.choice(slots)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            # half random (incompressible), half a repeated pattern (compressible)
            body = rng.randbytes(BLOCK // 2) + bytes([rng.randrange(256)]) * (BLOCK // 2)
            os.pwrite(fd, body, rng.randrange(blocks) * BLOCK)
            os.fsync(fd)
        except OSError:
            time.sleep(0.5)  # e.g. ENOSPC: retry later rather than die
        finally:
            os.close(fd)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1:
            next_at = time.monotonic()  # behind by a second: do not burst to catch up
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
