"""agent.lead_in: how the reads before a point are cut into what is read before the
freeze starts and what is read while it is being taken, and the gate that keeps the
freeze until those reads have ended."""

from __future__ import annotations

import threading
import time

import pytest

from agent.lead_in import MARGIN, MIN_SAMPLE, Pacing, ReadGate, split_tail

KIB = 1024
MIB = 1 << 20


def flat(batches: list[tuple[str, list[tuple[int, int]]]]) -> list[tuple[str, int, int]]:
    return [(key, at, size) for key, batch in batches for at, size in batch]


def test_no_tail_reads_everything_first_in_bounded_batches() -> None:
    sets = [("a", [(0, 3 * MIB), (10 * MIB, 4 * KIB)]), ("b", [(0, 8 * KIB)])]
    head, tail = split_tail(sets, MIB, 0, 2 * MIB)
    assert tail == []
    assert flat(head) == [("a", 0, MIB), ("a", MIB, MIB), ("a", 2 * MIB, MIB),
                          ("a", 10 * MIB, 4 * KIB), ("b", 0, 8 * KIB)]  # fmt: skip
    for _, batch in head:  # one disk per batch, each within the limit
        assert sum(size for _, size in batch) <= 2 * MIB
    assert [key for key, _ in head] == ["a", "a", "b"]


def test_the_tail_is_the_last_whole_pieces_that_fit() -> None:
    extents = [(i * 64 * KIB, 4 * KIB) for i in range(1000)]  # 4000 KiB of 4 KiB pieces
    head, tail = split_tail([("d", extents)], MIB, 10 * KIB, 8 * MIB)
    assert flat(tail) == [("d", 998 * 64 * KIB, 4 * KIB), ("d", 999 * 64 * KIB, 4 * KIB)]
    assert flat(head) + flat(tail) == [("d", at, size) for at, size in extents]  # order kept


def test_a_tail_spans_disks_in_order() -> None:
    sets = [("a", [(0, 8 * KIB)]), ("b", [(0, 4 * MIB)])]
    head, tail = split_tail(sets, MIB, 2 * MIB, 8 * MIB)
    assert flat(head) == [("a", 0, 8 * KIB), ("b", 0, MIB), ("b", MIB, MIB)]
    assert flat(tail) == [("b", 2 * MIB, MIB), ("b", 3 * MIB, MIB)]


def test_a_head_under_one_piece_goes_to_the_tail_too() -> None:
    head, tail = split_tail([("d", [(0, 12 * KIB)])], MIB, 8 * KIB, 8 * MIB)
    assert head == [] and flat(tail) == [("d", 0, 12 * KIB)]


def test_pacing_says_nothing_until_it_knows_both_figures() -> None:
    pacing = Pacing()
    assert pacing.tail_bytes(64 * MIB) == 0
    pacing.read(MIN_SAMPLE - 1, 0.001)  # too small to say anything about the disk
    pacing.lead = 0.05
    assert pacing.tail_bytes(64 * MIB) == 0
    pacing.read(100 * MIB, 1.0)
    assert pacing.tail_bytes(64 * MIB) == int(100 * MIB * 0.05 * MARGIN)
    pacing.read(300 * MIB, 1.0)  # smoothed: half the old, half the new
    assert pacing.read_rate == pytest.approx(200 * MIB)
    assert pacing.tail_bytes(MIB) == MIB  # never over the caller's limit


def test_the_gate_holds_until_the_reads_end() -> None:
    gate = ReadGate(margin=0.0)
    threading.Timer(0.1, gate.end, args=(True,)).start()
    started = time.monotonic()
    assert gate.hold(5.0) is True
    assert 0.05 < time.monotonic() - started < 4.0
    assert gate.held_at is not None and gate.held_at >= started


def test_the_gate_gives_the_point_up_on_a_failed_read_or_at_the_bound() -> None:
    failed = ReadGate(margin=0.0)
    failed.end(False)
    failed.end(True)  # the first word stands
    assert failed.hold(5.0) is False
    late = ReadGate(margin=0.05)
    started = time.monotonic()
    assert late.hold(0.1) is False  # waited 0.1 - margin, then refused
    assert time.monotonic() - started < 1.0
