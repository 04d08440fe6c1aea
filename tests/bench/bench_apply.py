"""Benchmark the master target's apply pipeline against plain pwrite.

    .venv/bin/python tests/bench/bench_apply.py [--quick]

On a 2 GiB replica that was first filled (an initial sync through the engine, so every
later write has real old contents to journal), apply ~1 GiB of random 1 MiB extents and
~1 GiB of random 64 KiB extents (4 KiB-aligned offsets, semi-compressible data: text-ish
and random pieces with zero runs), a tag every 64 MiB and a checkpoint at the end, so
the figure includes durability. The baseline is an os.pwrite loop of the same extents
into another filled 2 GiB file plus one final fdatasync. The same comparison on a new,
empty replica and a new sparse file (the initial-sync case) is reported as "fresh_*".
Also measured: materialising the point taken before the first 1 GiB of changes (a full
2 GiB copy plus the rollback), and the peak RSS of this process.

Runs in a directory on a real disk (never tmpfs). Prints human lines, then one JSON
object as the final line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from appliance.target.replica import DiskReplica
from appliance.target.store import ReplicaStore, StoreSettings

MIB = 1 << 20
GIB = 1 << 30
DISK = 2 * GIB
TAG_EVERY = 64 * MIB
ALIGN = 4096
WORDS = b"replica journal extent sector tag point block volume apply undo commit the of a".split()


def fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (longest matching mount point)."""
    best, kind = "", "unknown"
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind


def work_dir() -> Path:
    for candidate in (Path(tempfile.gettempdir()), Path("/var/tmp")):
        if fs_type(candidate) not in ("tmpfs", "ramfs"):
            return Path(tempfile.mkdtemp(prefix="bench-apply-", dir=candidate))
    raise SystemExit("bench_apply: no disk-backed temp directory (/tmp and /var/tmp are tmpfs)")


def make_pool(rng: random.Random, count: int = 24) -> list[bytes]:
    """1 MiB buffers of mixed content: zstd level 1 gets them to roughly 40-60 %."""
    pool = []
    for _ in range(count):
        parts: list[bytes] = []
        size = 0
        while size < MIB:
            kind = rng.random()
            n = rng.choice((4096, 8192, 16384, 32768))
            if kind < 0.4:
                text = b" ".join(rng.choice(WORDS) for _ in range(n // 5))
                piece = (text + b"\n" * n)[:n]
            elif kind < 0.75:
                piece = rng.randbytes(n)
            else:
                piece = bytes(n)
            parts.append(piece)
            size += n
        pool.append(b"".join(parts)[:MIB])
    return pool


Extent = tuple[int, int, int]  # (disk offset, pool index, start in the pool buffer)


def extents(rng: random.Random, pool: list[bytes], size: int, total: int) -> list[Extent]:
    """Where each write goes and which pool bytes it carries (sliced when written, so the
    work list costs no memory)."""
    out = []
    for i in range(total // size):
        start = rng.randrange(0, MIB - size + 1, ALIGN) if size < MIB else 0
        out.append((rng.randrange(0, DISK - size + 1, ALIGN), i % len(pool), start))
    return out


def payload(pool: list[bytes], size: int, index: int, start: int) -> bytes:
    buf = pool[index]
    return buf if size == len(buf) else buf[start : start + size]


def run_plain(path: Path, pool: list[bytes], size: int, work: list[Extent]) -> float:
    fd = os.open(path, os.O_RDWR)
    try:
        t0 = time.perf_counter()
        for offset, index, start in work:
            os.pwrite(fd, payload(pool, size, index, start), offset)
        os.fdatasync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


class Applier:
    def __init__(self, replica: DiskReplica) -> None:
        self.replica = replica
        self.seq = replica.applied_seq
        self.tags = 0

    def tag(self, name: str) -> None:
        self.seq += 1
        self.replica.tag(self.seq, name, "crash", time.time_ns())

    def run(self, pool: list[bytes], size: int, work: list[Extent]) -> float:
        t0 = time.perf_counter()
        since_tag = 0
        for offset, index, start in work:
            self.seq += 1
            self.replica.write(self.seq, offset, payload(pool, size, index, start))
            since_tag += size
            if since_tag >= TAG_EVERY:
                self.tags += 1
                self.tag(f"t{self.tags}")
                since_tag = 0
        self.replica.checkpoint()
        return time.perf_counter() - t0


def fill(applier: Applier, plain: Path, pool: list[bytes]) -> None:
    fd = os.open(plain, os.O_RDWR)
    try:
        chunk = 8 * MIB
        for offset in range(0, DISK, chunk):
            data = b"".join(pool[(offset // MIB + k) % len(pool)] for k in range(chunk // MIB))
            applier.seq += 1
            applier.replica.write(applier.seq, offset, data)
            os.pwrite(fd, data, offset)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    applier.replica.checkpoint()


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds


def series(
    label: str,
    *,
    size: int,
    works: list[list[Extent]],
    pool: list[bytes],
    plain: Path,
    applier: Applier,
    after_first: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Median MB/s of plain and apply over the runs (plain first, each from a synced state)."""
    nbytes = size * len(works[0])
    plain_s, apply_s = [], []
    for i, work in enumerate(works):
        os.sync()
        plain_s.append(run_plain(plain, pool, size, work))
        os.sync()
        apply_s.append(applier.run(pool, size, work))
        print(
            f"{label} run {i + 1}: plain {mb_s(nbytes, plain_s[-1]):7.1f} MB/s   "
            f"apply {mb_s(nbytes, apply_s[-1]):7.1f} MB/s",
            flush=True,
        )
        if i == 0 and after_first is not None:
            after_first()
    return mb_s(nbytes, statistics.median(plain_s)), mb_s(nbytes, statistics.median(apply_s))


def fresh_series(
    store: ReplicaStore, base: Path, pool: list[bytes], rng: random.Random, *, total: int,
    repeats: int,
) -> tuple[float, float]:  # fmt: skip
    """1 MiB extents onto a new, empty 2 GiB replica (and a new sparse plain file): the
    initial-sync case, where undo records are mostly zeros and both sides allocate."""
    plain_s, apply_s = [], []
    for i in range(repeats):
        applier = Applier(store.open_disk(f"fresh{i}", "machine", DISK))
        plain = base / f"fresh{i}.img"
        with open(plain, "wb") as f:
            f.truncate(DISK)
        work = extents(rng, pool, MIB, total)
        os.sync()
        plain_s.append(run_plain(plain, pool, MIB, work))
        os.sync()
        apply_s.append(applier.run(pool, MIB, work))
        plain.unlink()
        print(
            f"fresh 1 MiB run {i + 1}: plain {mb_s(total, plain_s[-1]):7.1f} MB/s   "
            f"apply {mb_s(total, apply_s[-1]):7.1f} MB/s",
            flush=True,
        )
    return mb_s(total, statistics.median(plain_s)), mb_s(total, statistics.median(apply_s))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB per run, one repeat")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    total = 256 * MIB if args.quick else GIB
    repeats = 1 if args.quick else 3
    rng = random.Random(20240601)
    pool = make_pool(rng)
    base = work_dir()
    print(f"work dir {base} ({fs_type(base)}), {os.cpu_count()} CPUs", flush=True)
    store = ReplicaStore(base / "state", base / "datastore", StoreSettings())
    try:
        replica = store.open_disk("bench", "machine", DISK)
        applier = Applier(replica)
        plain = base / "plain.img"
        with open(plain, "wb") as f:
            f.truncate(DISK)
        t0 = time.perf_counter()
        fill(applier, plain, pool)
        print(f"initial fill of 2 x 2 GiB: {time.perf_counter() - t0:.1f} s", flush=True)
        applier.tag("base")

        timings: dict[str, float] = {}

        def materialize_base() -> None:
            out = base / "out"
            out.mkdir()
            os.sync()
            t0 = time.perf_counter()
            store.materialize_disk("bench", "base", out, "base-copy")
            timings["materialize"] = time.perf_counter() - t0
            print(f"materialise 'base' ({total // MIB} MiB of changes back): "
                  f"{timings['materialize']:.1f} s", flush=True)  # fmt: skip
            shutil.rmtree(out)

        work_1m = [extents(rng, pool, MIB, total) for _ in range(repeats)]
        plain_1m, apply_1m = series(
            "1 MiB", size=MIB, works=work_1m, pool=pool, plain=plain, applier=applier,
            after_first=materialize_base,
        )  # fmt: skip
        del work_1m
        store.prune(now_ns=time.time_ns() + 10**18)  # retention drops the journal so far
        work_64k = [extents(rng, pool, 64 << 10, total) for _ in range(repeats)]
        plain_64k, apply_64k = series(
            "64 KiB", size=64 << 10, works=work_64k, pool=pool, plain=plain, applier=applier
        )
        del work_64k
        fresh_plain_1m, fresh_apply_1m = fresh_series(
            store, base, pool, rng, total=total, repeats=repeats
        )
    finally:
        store.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "bench": "apply",
        "apply_1m_mb_s": round(apply_1m, 1),
        "plain_1m_mb_s": round(plain_1m, 1),
        "ratio_1m": round(apply_1m / plain_1m, 3),
        "apply_64k_mb_s": round(apply_64k, 1),
        "plain_64k_mb_s": round(plain_64k, 1),
        "ratio_64k": round(apply_64k / plain_64k, 3),
        "fresh_apply_1m_mb_s": round(fresh_apply_1m, 1),
        "fresh_plain_1m_mb_s": round(fresh_plain_1m, 1),
        "fresh_ratio_1m": round(fresh_apply_1m / fresh_plain_1m, 3),
        "materialize_1g_back_s": round(timings["materialize"], 2),
        "rss_mib": round(rss_mib, 1),
        "targets_met": apply_1m >= 150 and apply_1m / plain_1m >= 0.35 and rss_mib < 150,
    }
    print(
        f"1 MiB: apply {apply_1m:.1f} MB/s vs plain {plain_1m:.1f} MB/s (ratio "
        f"{result['ratio_1m']}); 64 KiB: apply {apply_64k:.1f} vs {plain_64k:.1f} MB/s "
        f"(ratio {result['ratio_64k']}); fresh disk 1 MiB: apply {fresh_apply_1m:.1f} vs "
        f"{fresh_plain_1m:.1f} MB/s; peak RSS {rss_mib:.0f} MiB"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
