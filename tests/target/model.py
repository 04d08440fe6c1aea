"""A reference model of a disk's change stream, for checking the storage engine.

A stream is a list of ops with consecutive sequence numbers starting at 1. The model
replays a prefix into a bytearray: the image a replica must hold at ``durable_seq``, or
that a recovery point must materialise to.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import zstandard

from appliance.target.replica import DiskReplica
from appliance.wire.messages import Encoding, Extent, Extents

SECTOR = 512


@dataclass(frozen=True)
class Write:
    seq: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Zero:
    seq: int
    offset: int
    length: int


@dataclass(frozen=True)
class Tag:
    seq: int
    tag_id: str
    time_ns: int


@dataclass(frozen=True)
class Many:
    """One EXTENTS change: ``extents`` ascending, ``data`` the RAW ones' bytes in order."""

    seq: int
    extents: tuple[Extent, ...]
    data: bytes
    zstd: bool = False

    def message(self, disk_id: str = "d") -> Extents:
        if self.zstd and self.data:
            packed = zstandard.compress(self.data)
            return Extents(disk_id, self.seq, self.extents, Encoding.ZSTD, packed)
        return Extents.of(disk_id, self.seq, self.extents, self.data)


Op = Write | Zero | Tag | Many


def image(size: int, ops: list[Op], upto: int, base: bytes | None = None) -> bytes:
    """The disk after applying every op with ``seq <= upto`` (on top of ``base``)."""
    disk = bytearray(base if base is not None else bytes(size))
    for op in ops:
        if op.seq > upto:
            break
        if isinstance(op, Write):
            disk[op.offset : op.offset + len(op.data)] = op.data
        elif isinstance(op, Zero):
            disk[op.offset : op.offset + op.length] = bytes(op.length)
        elif isinstance(op, Many):
            at = 0
            for ext in op.extents:
                if ext.kind is Encoding.RAW:
                    disk[ext.offset : ext.offset + ext.length] = op.data[at : at + ext.length]
                    at += ext.length
                elif ext.kind is Encoding.ZERO:
                    disk[ext.offset : ext.offset + ext.length] = bytes(ext.length)
    return bytes(disk)


def renumber(op: Op, seq: int) -> Op:
    """``op`` with sequence number ``seq``."""
    return replace(op, seq=seq)


def tag_seqs(ops: list[Op]) -> dict[str, int]:
    return {op.tag_id: op.seq for op in ops if isinstance(op, Tag)}


def payload(rng: random.Random, n: int) -> bytes:
    """Data of a mixed kind: random, text-ish (compressible) or with zero runs."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(n)
    if kind == 1:
        return (b"secondsite %d " % rng.randrange(1000) * (n // 10 + 1))[:n]
    if kind == 2:
        half = rng.randrange(0, n + 1, SECTOR)
        return rng.randbytes(half) + bytes(n - half)
    return bytes([rng.randrange(1, 256)]) * n


def random_stream(
    seed: int,
    size: int,
    count: int,
    *,
    max_sectors: int = 64,
    tag_every: int = 8,
    first_seq: int = 1,
    tag_prefix: str = "t",
    zero_share: float = 0.15,
) -> list[Op]:
    """``count`` ops: writes and zero writes of 1..max_sectors sectors (some of them
    overlapping), a tag roughly every ``tag_every`` ops."""
    rng = random.Random(seed)
    ops: list[Op] = []
    hot = rng.randrange(0, size, SECTOR)  # a hot spot makes overlaps common
    for i in range(count):
        seq = first_seq + i
        if rng.random() < 1 / tag_every:
            ops.append(Tag(seq, f"{tag_prefix}{seq}", 1_000_000 * seq))
            continue
        n = rng.randint(1, max_sectors) * SECTOR
        n = min(n, size)
        if rng.random() < 0.3:
            offset = min(hot, size - n) // SECTOR * SECTOR
        else:
            offset = rng.randrange(0, size - n + 1, SECTOR)
        if rng.random() < zero_share:
            ops.append(Zero(seq, offset, n))
        else:
            ops.append(Write(seq, offset, payload(rng, n)))
    return ops


def random_many(
    rng: random.Random, seq: int, size: int, *, count: int = 24, max_sectors: int = 16
) -> Many:
    """An EXTENTS change: up to ``count`` ascending extents of every kind, some of them
    back to back, the payload zstd half of the time."""
    extents: list[Extent] = []
    data = b""
    pos = rng.randrange(0, size // 2, SECTOR)
    for _ in range(rng.randint(1, count)):
        n = rng.randint(1, max_sectors) * SECTOR
        if pos + n > size:
            break
        kind = rng.choice([Encoding.RAW, Encoding.RAW, Encoding.RAW, Encoding.ZERO, Encoding.SAME])
        extents.append(Extent(pos, n, kind))
        if kind is Encoding.RAW:
            data += payload(rng, n)
        pos += n + rng.choice([0, SECTOR, 8 * SECTOR, rng.randrange(0, size // 8, SECTOR)])
    if not extents:
        extents.append(Extent(0, SECTOR, Encoding.RAW))
        data = payload(rng, SECTOR)
    return Many(seq, tuple(extents), data, zstd=rng.random() < 0.5)


def with_many(seed: int, ops: list[Op], size: int, share: float = 0.3) -> list[Op]:
    """``ops`` with about ``share`` of its writes replaced by EXTENTS changes."""
    rng = random.Random(seed)
    return [
        random_many(rng, op.seq, size) if isinstance(op, Write) and rng.random() < share else op
        for op in ops
    ]


def apply(replica: DiskReplica, ops: list[Op], kind: str = "crash") -> None:
    for op in ops:
        if isinstance(op, Write):
            replica.write(op.seq, op.offset, op.data)
        elif isinstance(op, Zero):
            replica.write_zero(op.seq, op.offset, op.length)
        elif isinstance(op, Many):
            replica.write_extents(op.seq, op.message())
        else:
            replica.tag(op.seq, op.tag_id, kind, op.time_ns)


def flat_of(descriptor: Path) -> Path:
    return descriptor.with_name(descriptor.name.removesuffix(".vmdk") + "-flat.vmdk")


def read(path: Path) -> bytes:
    return path.read_bytes()
