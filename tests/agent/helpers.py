"""Shared by the agent tests: whole-device reads, chunk-level diffs, file churn."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from agent.digest import DeviceReader, chunk_digest
from agent.discovery import Disk, discover
from agent.trackers import CHUNK, DirtyMap


def find(device: Path) -> Disk:
    matches = [d for d in discover() if d.path == device]
    assert len(matches) == 1, f"{device} not discovered"
    return matches[0]


def read_all(path: Path, size: int) -> bytes:
    with DeviceReader(path, size) as reader:
        return reader.read(0, size)


def chunk_diff(before: bytes, after: bytes, chunk: int = CHUNK) -> set[int]:
    assert len(before) == len(after)
    return {
        i // chunk
        for i in range(0, len(before), chunk)
        if before[i : i + chunk] != after[i : i + chunk]
    }


def chunks_at(dirty: DirtyMap, chunk: int = CHUNK) -> set[int]:
    """The `chunk`-sized chunks a map of any granularity touches."""
    return chunks_in(dirty.extents(), chunk)


def chunks_in(extents: Iterable[tuple[int, int]], chunk: int = CHUNK) -> set[int]:
    found: set[int] = set()
    for offset, length in extents:
        found.update(range(offset // chunk, -(-(offset + length) // chunk)))
    return found


def digests_of(image: bytes, chunk: int = CHUNK) -> dict[int, bytes]:
    return {i // chunk: chunk_digest(image[i : i + chunk]) for i in range(0, len(image), chunk)}


def write_file(mnt: Path, name: str, size: int) -> None:
    """Random contents (so no chunk can match by accident), then the filesystem synced."""
    with open(mnt / name, "wb") as f:
        f.write(os.urandom(size))
    subprocess.run(["sync", "-f", str(mnt)], check=True)
