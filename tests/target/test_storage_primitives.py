"""appliance.storage: atomic writes, positional I/O, sparse copies, zstd, segment files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.storage.atomic import atomic_write, fsync_dir
from appliance.storage.compress import compress, decompress
from appliance.storage.fileio import (
    copy_sparse,
    data_extents,
    pread_exact,
    pwritev_all,
    write_zeros,
)
from appliance.storage.segments import (
    Segment,
    SegmentCorrupt,
    SegmentReader,
    create_segment,
    cut_segment,
    load_segments,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_atomic_write_exclusive_never_clobbers(tmp_path: Path) -> None:
    target = tmp_path / "descriptor"
    atomic_write(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["descriptor"]


def test_fsync_dir_rejects_a_file(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")


def test_write_zeros_punches_a_hole(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        write_zeros(fd, 256 << 10, 512 << 10)
        data = pread_exact(fd, 1 << 20, 0)
        extents = list(data_extents(fd, 1 << 20))
    finally:
        os.close(fd)
    assert data[256 << 10 : 768 << 10] == bytes(512 << 10)
    assert data[: 256 << 10] != bytes(256 << 10)
    assert os.path.getsize(path) == 1 << 20
    assert extents == [(0, 256 << 10), (768 << 10, 256 << 10)]


def test_copy_sparse_copies_data_and_keeps_holes(tmp_path: Path) -> None:
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    size = 4 << 20
    content = bytearray(size)
    content[100_000:300_000] = os.urandom(200_000)
    content[3 << 20 : (3 << 20) + 4096] = b"z" * 4096
    with open(src_path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(content[: 1 << 20])  # allocated, but mostly zeros
        f.seek(3 << 20)
        f.write(content[3 << 20 : (3 << 20) + 4096])
    with open(dst_path, "wb") as f:
        f.truncate(size)
    src, dst = os.open(src_path, os.O_RDONLY), os.open(dst_path, os.O_RDWR)
    try:
        written = copy_sparse(src, dst, size)
    finally:
        os.close(src)
        os.close(dst)
    assert dst_path.read_bytes() == bytes(content)
    # Only the 64 KiB granules holding data (4 around the random run) and the one
    # allocated 4 KiB block were written: zeros and holes stayed holes.
    assert written == 4 * (64 << 10) + 4096
    assert os.stat(dst_path).st_blocks * 512 <= written


def test_pread_exact_short_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="short read"):
            pread_exact(fd, 200, 0)
    finally:
        os.close(fd)


def test_pwritev_all_writes_more_buffers_than_iov_max(tmp_path: Path) -> None:
    path = tmp_path / "f"
    buffers = [bytes([i % 251]) * (1 + i % 7) for i in range(3000)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwritev_all(fd, buffers, 10)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(10) + b"".join(buffers)


def test_compress_roundtrip_and_refusal() -> None:
    text = b"recovery point " * 1000
    packed = compress(text, 1)
    assert packed is not None and len(packed) < len(text)
    assert decompress(packed, len(text)) == text
    assert compress(os.urandom(4096), 1) is None  # would not shrink
    with pytest.raises(ValueError):
        decompress(packed, len(text) - 1)
    with pytest.raises(ValueError):
        decompress(b"not zstd at all", 10)


def new_segment(directory: Path, start: int) -> Segment:
    return create_segment(directory, start, magic=b"TESTSEG1", version=3, owner="s1", suffix=".log")


def load(directory: Path, magic: bytes = b"TESTSEG1") -> list[Segment]:
    return load_segments(directory, magic=magic, version=3, suffix=".log")


def test_segments_create_load_and_detect_damage(tmp_path: Path) -> None:
    first = new_segment(tmp_path, 0)
    with open(first.path, "ab") as f:
        f.write(b"x" * 100)
    second = new_segment(tmp_path, 100)
    (tmp_path / ".0000000000000200.log.999.tmp").write_bytes(b"half")  # a crashed creation
    loaded = load(tmp_path)
    assert [(s.start, s.length) for s in loaded] == [(0, 100), (100, 0)]
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileExistsError):
        new_segment(tmp_path, 100)
    cut_segment(loaded[0], 40)
    with pytest.raises(SegmentCorrupt) as gap:  # 0..40 is not followed by 100
        load(tmp_path)
    assert gap.value.position == 40
    second.path.unlink()
    with pytest.raises(SegmentCorrupt):
        load(tmp_path, magic=b"OTHERLOG")
    with open(first.path, "r+b") as f:
        f.seek(12)
        f.write(b"\xff")  # inside the start field: the header CRC catches it
    with pytest.raises(SegmentCorrupt):
        load(tmp_path)


def test_segment_reader_windows(tmp_path: Path) -> None:
    seg = create_segment(tmp_path, 1000, magic=b"TESTSEG1", version=1, owner="o", suffix=".log")
    data = os.urandom(300_000)
    with open(seg.path, "ab") as f:
        f.write(data)
    seg.length = len(data)
    with SegmentReader(seg) as reader:
        assert bytes(reader.get(1000, 10, seg.end)) == data[:10]
        assert bytes(reader.get(1000 + 299_990, 50, seg.end)) == data[-10:]  # clipped at limit
        assert bytes(reader.get(1500, 100, 1550)) == data[500:550]
