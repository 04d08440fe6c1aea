"""A deterministic replication stream and the disk image it must produce.

Tests send `StreamScript` messages to a real receiver and compare what lands on disk
with `image_at(seq)`: the source disk as it was after applying the first `seq` frames.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass

from appliance.wire.messages import Data, Encoding, Extent, Extents, Tag, TagKind

BLOCK = 4096


@dataclass(frozen=True)
class Op:
    seq: int
    kind: str  # "data", "zero", "same" (repeat of the previous extent: no change) or "tag"
    offset: int = 0  # (or "extents": `parts` under one seq)
    length: int = 0
    tag_id: str = ""
    parts: tuple[tuple[int, int, str], ...] = ()  # "extents": (offset, length, "data"/"zero")


class StreamScript:
    """`count` frames: random extents (some in a hot region, some zero) and tags."""

    def __init__(
        self,
        seed: int,
        size: int,
        count: int,
        *,
        max_blocks: int = 256,
        tag_every: int = 20,
        extents_every: int = 0,
    ) -> None:
        self.seed, self.size = seed, size
        self.epoch_ns = time.time_ns()  # tags carry "now": retention must not prune them
        rng = random.Random(seed)
        blocks = size // BLOCK
        self.ops: list[Op] = []
        for seq in range(1, count + 1):
            if rng.randrange(tag_every) == 0:
                self.ops.append(Op(seq, "tag", tag_id=f"t{seq:06d}"))
                continue
            if extents_every and rng.randrange(extents_every) == 0:
                self.ops.append(self._extents_op(rng, seq, blocks))
                continue
            length = rng.randint(1, max_blocks)
            hot = rng.random() < 0.4  # overwrite a small region often: undo data matters
            start = rng.randrange(0, max(1, (blocks // 16 if hot else blocks) - length))
            previous = self.ops[-1] if self.ops else None
            if previous and previous.kind == "data" and rng.random() < 0.05:
                # An identical rewrite of the extent just sent: the process server sends SAME.
                self.ops.append(Op(seq, "same", previous.offset, previous.length))
                continue
            kind = "zero" if rng.random() < 0.05 else "data"
            self.ops.append(Op(seq, kind, start * BLOCK, length * BLOCK))

    @staticmethod
    def _extents_op(rng: random.Random, seq: int, blocks: int) -> Op:
        """An EXTENTS: 1-64 ascending 4-16 KiB extents with gaps, some of them zero."""
        count = rng.randint(1, 64)
        at = rng.randrange(0, blocks - 8 * count)
        parts = []
        for _ in range(count):
            at += rng.randrange(0, 4)
            length = rng.randint(1, 4)
            parts.append((at * BLOCK, length * BLOCK, "zero" if rng.random() < 0.1 else "data"))
            at += length
        return Op(seq, "extents", parts=tuple(parts))

    def part_payload(self, seq: int, index: int, length: int) -> bytes:
        return self.payload(Op(seq * 100_000 + index, "data", 0, length))

    def payload(self, op: Op) -> bytes:
        rng = random.Random(self.seed * 1_000_003 + op.seq)
        # Half random, half repeated text: compressible enough to exercise zstd paths.
        half = op.length // 2
        text = (b"secondsite %d " % op.seq) * (op.length // 12 + 1)
        return rng.randbytes(half) + text[: op.length - half]

    def message(self, op: Op, disk_id: str, *, same_as_raw: bool = False) -> Data | Extents | Tag:
        """The frame for `op`; with `same_as_raw` a "same" op is the identical RAW rewrite
        an agent sends (a process server turns it back into SAME)."""
        if op.kind == "same" and same_as_raw:
            previous = self.ops[op.seq - 2]
            return Data(disk_id, op.seq, op.offset, op.length, Encoding.RAW, self.payload(previous))
        if op.kind == "extents":
            kinds = {"data": Encoding.RAW, "zero": Encoding.ZERO}
            extents = [Extent(off, n, kinds[kind]) for off, n, kind in op.parts]
            data = b"".join(
                self.part_payload(op.seq, i, n)
                for i, (_, n, kind) in enumerate(op.parts)
                if kind == "data"
            )
            return Extents.of(disk_id, op.seq, extents, data)
        if op.kind == "tag":
            return Tag(
                disk_id, op.seq, op.tag_id, TagKind.CRASH, 1_700_000_000_000_000_000 + op.seq
            )
        if op.kind in ("zero", "same"):
            encoding = Encoding.ZERO if op.kind == "zero" else Encoding.SAME
            return Data(disk_id, op.seq, op.offset, op.length, encoding, b"")
        return Data(disk_id, op.seq, op.offset, op.length, Encoding.RAW, self.payload(op))

    def tags(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "tag"]

    def image_at(self, seq: int) -> bytearray:
        image = bytearray(self.size)
        for op in self.ops[:seq]:
            self._apply(image, op)
        return image

    def images_at(self, seqs: list[int]) -> dict[int, str]:
        """sha256 of the image after each of `seqs`, in one pass over the stream."""
        wanted, digests = sorted(set(seqs)), {}
        image = bytearray(self.size)
        done = 0
        for target in wanted:
            for op in self.ops[done:target]:
                self._apply(image, op)
            done = target
            digests[target] = hashlib.sha256(image).hexdigest()
        return digests

    def _apply(self, image: bytearray, op: Op) -> None:
        if op.kind == "data":
            image[op.offset : op.offset + op.length] = self.payload(op)
        elif op.kind == "zero":
            image[op.offset : op.offset + op.length] = bytes(op.length)
        for i, (offset, length, kind) in enumerate(op.parts):
            data = self.part_payload(op.seq, i, length) if kind == "data" else bytes(length)
            image[offset : offset + length] = data


def file_sha256(path: str | bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
