"""TokenBucket: rate, burst, debt and run-time rate changes, on a loop with virtual time.

`run_virtual` runs a coroutine on a real asyncio loop whose clock only moves when
every task is waiting: the selector, asked to sleep until the next timer, jumps the
clock there instead. Timers, `asyncio.sleep` and the bucket's `clock=loop.time` all
see the same time, so seconds of throttling run in milliseconds and exactly.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from appliance.process.throttle import MIN_BURST, TokenBucket

T = TypeVar("T")
KIB = 1024
MIB = 1024 * 1024


class _JumpingSelector(selectors.DefaultSelector):
    loop: VirtualLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:  # no timer and nothing ready: real I/O only, which we lack
            raise RuntimeError("virtual loop would block forever (a missed wake-up?)")
        if timeout > 0:
            self.loop.now += timeout
        return list(super().select(0))


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        return runner.run(coro)


def loop_time() -> Callable[[], float]:
    return asyncio.get_running_loop().time


# -- without a loop: a hand-moved clock ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(1000.0, burst=500, clock=clock)
    assert bucket.try_take(500)  # a new bucket is full
    assert not bucket.try_take(1)
    assert bucket.delay_for(100) == pytest.approx(0.1)
    clock.t += 0.1
    assert bucket.try_take(100)
    clock.t += 60.0  # idle for a minute: still only one burst available
    assert bucket.tokens == pytest.approx(500)
    assert bucket.bytes_total == 600


def test_frame_bigger_than_burst_goes_into_debt() -> None:
    clock = Clock()
    bucket = TokenBucket(1000.0, burst=500, clock=clock)
    assert bucket.try_take(2000)  # full bucket pays a big frame: no deadlock
    assert bucket.tokens == pytest.approx(-1500)
    assert bucket.delay_for(100) == pytest.approx(1.6)  # the debt, then its own bytes
    clock.t += 1.0
    assert not bucket.try_take(100)
    clock.t += 0.6
    assert bucket.try_take(100)


def test_unlimited_and_paused() -> None:
    clock = Clock()
    bucket = TokenBucket(None, clock=clock)
    assert bucket.try_take(10**12) and bucket.delay_for(10**12) == 0.0
    bucket.set_rate(0.0)
    assert not bucket.try_take(1)
    assert bucket.delay_for(1) == float("inf")
    bucket.set_rate(1e6)
    assert bucket.burst == MIN_BURST  # default burst: 100 ms of rate, at least MIN_BURST
    bucket.set_rate(1e9)
    assert bucket.burst == 10**8
    with pytest.raises(ValueError):
        bucket.set_rate(-1.0)


# -- on the virtual loop -----------------------------------------------------------------


def test_rate_accuracy() -> None:
    async def scenario() -> tuple[float, TokenBucket]:
        bucket = TokenBucket(2 * MIB, burst=64 * KIB, clock=loop_time())
        start = bucket.now()
        for _ in range(400):  # 400 x 40 KiB = 15.6 MiB
            await bucket.consume(40 * KIB)
        return bucket.now() - start, bucket

    elapsed, bucket = run_virtual(scenario())
    expected = (400 * 40 * KIB - 64 * KIB) / (2 * MIB)  # the first burst is free
    assert elapsed == pytest.approx(expected, rel=0.005)
    assert bucket.bytes_total == 400 * 40 * KIB
    assert bucket.waited_seconds == pytest.approx(elapsed, rel=0.01)


def test_concurrent_consumers_fifo_and_total_rate() -> None:
    async def scenario() -> tuple[float, list[int]]:
        bucket = TokenBucket(1 * MIB, burst=MIN_BURST, clock=loop_time())
        order: list[int] = []

        async def one(i: int, size: int) -> None:
            await bucket.consume(size)
            order.append(i)

        start = bucket.now()
        # One 3 MiB frame among small ones: it is served in its turn, not starved.
        sizes = [100 * KIB, 3 * MIB, *([50 * KIB] * 20)]
        await asyncio.gather(*(one(i, s) for i, s in enumerate(sizes)))
        return bucket.now() - start, order

    elapsed, order = run_virtual(scenario())
    assert order == list(range(22))
    total = 100 * KIB + 3 * MIB + 20 * 50 * KIB
    assert elapsed == pytest.approx((total - MIN_BURST) / MIB, rel=0.01)


def test_set_rate_wakes_waiters_immediately() -> None:
    async def scenario() -> list[float]:
        bucket = TokenBucket(1000.0, burst=1000, clock=loop_time())
        await bucket.consume(1000)  # empty the bucket
        done: list[float] = []

        async def waiter() -> None:
            await bucket.consume(1000)  # would take 1 s at 1000 B/s
            done.append(bucket.now())

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.25)
        assert not done
        bucket.set_rate(1e6, burst=1000)  # 1000 bytes now need ~0.75 ms more
        await task
        return done

    (finished,) = run_virtual(scenario())
    assert 0.25 < finished < 0.2515


def test_pause_and_resume() -> None:
    async def scenario() -> float:
        bucket = TokenBucket(0.0, burst=1000, clock=loop_time())
        task = asyncio.create_task(bucket.consume(10))
        await asyncio.sleep(30.0)  # paused: nothing gets through, however long
        assert not task.done()
        bucket.set_rate(1000.0)
        await task
        return bucket.now()

    assert run_virtual(scenario()) == pytest.approx(30.01, abs=1e-6)


def test_cancelled_waiter_lets_the_next_one_go() -> None:
    async def scenario() -> float:
        bucket = TokenBucket(1000.0, burst=1000, clock=loop_time())
        await bucket.consume(1000)
        big = asyncio.create_task(bucket.consume(1000))  # first in line, 1 s away
        await asyncio.sleep(0)
        small = asyncio.create_task(bucket.consume(100))
        await asyncio.sleep(0.05)
        big.cancel()
        await small
        return bucket.now()

    # Without the cancelled frame ahead, 100 bytes are ready at 0.1 s.
    assert run_virtual(scenario()) == pytest.approx(0.1, abs=1e-6)


def test_unlimited_consume_never_suspends() -> None:
    async def scenario() -> int:
        bucket = TokenBucket(None, clock=loop_time())
        for _ in range(1000):
            await bucket.consume(MIB)
        assert bucket.now() == 0.0
        return bucket.bytes_total

    assert run_virtual(scenario()) == 1000 * MIB


def test_short_waits_do_not_spin_on_uvloop() -> None:
    """Real time: uvloop's millisecond timers must not turn sub-ms waits into a busy loop."""

    async def scenario() -> tuple[float, float, int]:
        bucket = TokenBucket(20e6, burst=MIN_BURST)  # 4 KiB frames: ~0.2 ms apart
        started, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - started < 0.3:
            await bucket.consume(4 * KIB)
        return time.perf_counter() - started, time.process_time() - cpu, bucket.bytes_total

    wall, cpu, total = uvloop.run(scenario())
    assert (total - MIN_BURST) / wall == pytest.approx(20e6, rel=0.1)
    assert cpu < wall / 2, (cpu, wall)  # a spinning waiter burns the whole interval
