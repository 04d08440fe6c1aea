"""FairShare: equal bytes per disk under contention, bounded credit for an idle disk.

Each disk is a task that, like the forwarder, holds one frame at a time: acquire,
"send" (a short virtual pause), next frame. Runs on the virtual-time loop.
"""

from __future__ import annotations

import asyncio

import pytest

from appliance.process.throttle import FairShare, TokenBucket
from tests.process.test_throttle import loop_time, run_virtual

KIB = 1024
MIB = 1024 * 1024
RATE = 10 * MIB  # bytes/s


async def _disk(share: FairShare, disk: str, frame: int, until: float, gap: float) -> None:
    while share.bucket.now() < until:
        await share.acquire(disk, frame)
        await asyncio.sleep(gap)  # send the frame, read the next from the spool


def _shares(frames: dict[str, int], seconds: float, gap: float = 0.001) -> dict[str, int]:
    async def scenario() -> dict[str, int]:
        share = FairShare(TokenBucket(RATE, clock=loop_time()))
        await asyncio.gather(*(_disk(share, d, f, seconds, gap) for d, f in frames.items()))
        return dict(share.bytes_by_disk)

    return run_virtual(scenario())


def test_noisy_big_frames_do_not_starve_small_frames() -> None:
    frames = {"noisy": 4 * MIB, "quiet": 16 * KIB, "middle": 256 * KIB}
    got = _shares(frames, seconds=30.0)
    fair = sum(got.values()) / len(got)
    assert sum(got.values()) == pytest.approx(30 * RATE, rel=0.05)  # link kept full
    for disk, sent in got.items():
        assert sent == pytest.approx(fair, rel=0.10), (disk, got)


def test_without_contention_a_disk_takes_what_it_needs() -> None:
    # A lone small-frame disk is limited only by the bucket, not by turns.
    got = _shares({"alone": 64 * KIB}, seconds=5.0, gap=0.0)
    assert got["alone"] == pytest.approx(5 * RATE, rel=0.05)


def test_slow_disk_gets_what_it_asks_and_the_rest_goes_to_the_others() -> None:
    async def scenario() -> dict[str, int]:
        share = FairShare(TokenBucket(RATE, clock=loop_time()))
        await asyncio.gather(
            _disk(share, "trickle", 64 * KIB, 20.0, gap=0.1),  # ~0.6 MiB/s of demand
            _disk(share, "a", MIB, 20.0, gap=0.001),
            _disk(share, "b", 256 * KIB, 20.0, gap=0.001),
        )
        return dict(share.bytes_by_disk)

    got = run_virtual(scenario())
    assert got["trickle"] == pytest.approx(20 * 10 * 64 * KIB, rel=0.05)  # never held back
    assert got["a"] == pytest.approx(got["b"], rel=0.10)


def test_idle_disk_does_not_bank_credit() -> None:
    """A disk back after 20 s idle catches up at most `credit` bytes, then shares equally."""
    credit = MIB

    async def scenario() -> tuple[int, int, int]:
        share = FairShare(TokenBucket(RATE, clock=loop_time()), credit=credit)
        first = asyncio.gather(
            _disk(share, "a", MIB, 40.0, 0.001), _disk(share, "b", MIB, 40.0, 0.001)
        )
        await share.acquire("late", 64 * KIB)  # was active once, long ago
        await asyncio.sleep(20.0)
        before = dict(share.bytes_by_disk)
        returned = asyncio.create_task(_disk(share, "late", 64 * KIB, 23.0, 0.001))
        await asyncio.sleep(3.0)  # 30 MiB of link time while all three compete
        late = share.bytes_by_disk["late"] - before["late"]
        a = share.bytes_by_disk["a"] - before["a"]
        await returned
        await first
        return late, a, share.forget_idle()

    late, a, dropped = run_virtual(scenario())
    # Banking 20 s of turns would give "late" the whole link for seconds; it gets its
    # third plus at most the credit (and one frame of rounding).
    assert late <= 10 * MIB + credit + MIB
    assert late >= 9 * MIB
    assert a == pytest.approx(10 * MIB, abs=credit + 2 * MIB)
    assert dropped >= 1  # "late" stopped at 23 s: its tags are forgettable by 40 s


def test_rate_change_applies_to_waiting_disks() -> None:
    async def scenario() -> float:
        bucket = TokenBucket(1000.0, burst=1000, clock=loop_time())
        share = FairShare(bucket)
        await share.acquire("x", 1000)
        waiting = asyncio.create_task(share.acquire("y", 5000))  # 5 s at 1000 B/s
        await asyncio.sleep(1.0)
        bucket.set_rate(1e6)
        await waiting
        return bucket.now()

    assert run_virtual(scenario()) == pytest.approx(1.0, abs=0.01)


def test_remove_forgets_a_disk() -> None:
    async def scenario() -> FairShare:
        share = FairShare(TokenBucket(None, clock=loop_time()))
        await share.acquire("gone", 10 * MIB)
        share.remove("gone")
        return share

    share = run_virtual(scenario())
    assert "gone" not in share.bytes_by_disk
    assert share.forget_idle() == 0
