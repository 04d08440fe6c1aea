"""Spool throughput: append + group commit of 1 MiB DATA records, against plain writes.

Run: .venv/bin/python tests/bench/bench_spool.py [--mib N] [--group G] [--runs R]
     [--segment-mib S]

- spool: `SpoolStream.append(Data.raw(...))` for G records, then `commit()` (one
  fdatasync for the group); a second thread `release()`s what was committed, as the
  forwarder does once the master target acknowledges, so segments come and go as in
  service (the run ends when the last release is done).
- plain: what `dd bs=1M oflag=... ; sync` would do: the same bytes written with
  os.write in 1 MiB pieces to one file, fdatasync every G MiB.

Both write N MiB to the same disk-backed directory, alternating, `runs` times each;
the medians and their ratio are reported, and the CPU time per MiB (this process,
Linux /proc) because on a shared machine wall-clock swings with what else runs. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from appliance.process.spool import Spool, SpoolSettings  # noqa: E402
from appliance.wire.messages import Data  # noqa: E402

MIB = 1 << 20


def workdir() -> Path:
    """A temp directory on a real disk (fdatasync on tmpfs would measure nothing)."""
    for candidate in ("/var/tmp", "/tmp"):
        if os.statvfs(candidate).f_bavail * os.statvfs(candidate).f_frsize < 2 << 30:
            continue
        with open("/proc/mounts") as mounts:
            fstypes = {line.split()[1]: line.split()[2] for line in mounts}
        if fstypes.get(candidate, fstypes.get("/")) != "tmpfs":
            return Path(tempfile.mkdtemp(prefix="bench-spool-", dir=candidate))
    raise SystemExit("bench_spool: no disk-backed temp directory with 2 GiB free")


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_spool(spool: Spool, pool: list[bytes], mib: int, group: int) -> tuple[float, float]:
    stream = spool.stream("bench", "bench", 1 << 40)
    seq = stream.appended_seq
    acked: queue.SimpleQueue[int | None] = queue.SimpleQueue()

    def forwarder() -> None:  # the master target acknowledges; segments go
        while (upto := acked.get()) is not None:
            stream.release(upto)

    thread = threading.Thread(target=forwarder)
    c0, t0 = cpu(), time.perf_counter()
    thread.start()
    for i in range(mib):
        seq += 1
        stream.append(Data.raw("bench", seq, (i % 1024) * MIB, pool[i % len(pool)]))
        if seq % group == 0 or i == mib - 1:
            acked.put(stream.commit())
    acked.put(None)
    thread.join()
    return time.perf_counter() - t0, cpu() - c0


def run_plain(path: Path, pool: list[bytes], mib: int, group: int) -> tuple[float, float]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        c0, t0 = cpu(), time.perf_counter()
        for i in range(mib):
            view = memoryview(pool[i % len(pool)])
            while view:
                view = view[os.write(fd, view) :]
            if (i + 1) % group == 0 or i == mib - 1:
                os.fdatasync(fd)
        return time.perf_counter() - t0, cpu() - c0
    finally:
        os.close(fd)
        path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB written per run")
    parser.add_argument("--group", type=int, default=8, help="records per commit")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--segment-mib", type=int, default=16, help="spool segment size")
    args = parser.parse_args()
    pool = [os.urandom(MIB) for _ in range(16)]
    base = workdir()
    spool = Spool(base / "spool", SpoolSettings(segment_bytes=args.segment_mib * MIB))
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "spool": []}
    try:
        for run in range(args.runs):
            os.sync()
            results["plain"].append(run_plain(base / "plain", pool, args.mib, args.group))
            os.sync()
            results["spool"].append(run_spool(spool, pool, args.mib, args.group))
            line = "   ".join(
                f"{mode} {args.mib / wall:7.1f} MB/s ({1000 * cpu_s / args.mib:.2f} ms CPU/MiB)"
                for mode, ((wall, cpu_s),) in ((m, results[m][-1:]) for m in ("plain", "spool"))
            )
            print(f"run {run + 1}: {line}", flush=True)
    finally:
        spool.close()
        for path in sorted(base.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        base.rmdir()
    mbs = {m: statistics.median(args.mib / w for w, _ in r) for m, r in results.items()}
    cpu_ms = {m: statistics.median(1000 * c / args.mib for _, c in r) for m, r in results.items()}
    print(
        json.dumps(
            {
                "bench": "spool",
                "mib": args.mib,
                "group": args.group,
                "segment_mib": args.segment_mib,
                "plain_mb_s": round(mbs["plain"], 1),
                "spool_mb_s": round(mbs["spool"], 1),
                "ratio": round(mbs["spool"] / mbs["plain"], 3),
                "plain_cpu_ms_per_mib": round(cpu_ms["plain"], 2),
                "spool_cpu_ms_per_mib": round(cpu_ms["spool"], 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
