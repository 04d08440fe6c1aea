"""Bandwidth control toward the master target: a token bucket in bytes per second.

`TokenBucket` holds the tokens; `consume` waits for them, first come first served.
The waiting itself lives in `TokenGate`, which serves waiters in the order of a key
whenever the bucket can pay the first one; `consume` uses a FIFO gate, and
`FairShare` (per-disk fairness, below) a gate ordered by per-disk virtual time.

Nothing here polls: the first waiter of a gate sleeps on one loop timer set for the
moment the bucket will have its tokens, and `set_rate` re-arms every gate at once, so
a rate change takes effect immediately rather than after the old timer fires.

Time comes from the injected `clock` (token accounting) and the running loop's timers
(waking up). In production both are the monotonic clock; tests run on a loop whose
time is virtual and pass `clock=loop.time`, so hours of throttling take milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable

# A bucket may always hold at least this much, so that on a slow link a typical frame
# is paid from the bucket rather than by waiting for a full one and going into debt.
MIN_BURST = 256 * 1024
BURST_SECONDS = 0.1  # default burst: this long at the configured rate
# Token arithmetic is float; half a byte of slack keeps a waiter woken exactly on time
# by its timer from seeing "0.0000001 bytes short" and re-arming for nanoseconds.
_SLACK = 0.5
# Shortest timer a gate arms. uvloop's timers count whole milliseconds, so a 0.2 ms
# timer fires at once, finds the tokens still short and re-arms: a busy loop that ate
# a core at 4 KiB frames. Waking up to 1 ms late costs latency, not rate: tokens keep
# accruing meanwhile and one wake-up then grants every waiter they cover.
MIN_TIMER = 0.001


def default_burst(rate: float) -> int:
    return max(int(rate * BURST_SECONDS), MIN_BURST)


class TokenBucket:
    """`rate` bytes per second (None = unlimited, 0 = paused), holding at most `burst`.

    A request for n bytes is paid when the bucket holds min(n, burst) tokens; all n are
    taken, so a frame bigger than the burst leaves the bucket in debt and the next
    requests wait it off. Big frames therefore pass (no deadlock) and the long-run rate
    holds: in any interval t, at most burst + rate * t bytes plus one frame's excess
    over the burst.

    Call everything from the event loop's thread; the bucket is not thread-safe.
    Statistics: `bytes_total` paid, `waited_seconds` summed over waiting callers.
    """

    def __init__(
        self,
        rate: float | None,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._fixed_burst = burst  # None: follow the rate (default_burst)
        self._rate: float | None = None
        self._burst = 0
        self._tokens = 0.0
        self._stamp = clock()
        self._listeners: list[Callable[[], None]] = []
        self.bytes_total = 0
        self.waited_seconds = 0.0
        self.set_rate(rate, burst)
        self._fifo = TokenGate(self)

    @property
    def rate(self) -> float | None:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    @property
    def tokens(self) -> float:
        """Tokens now (negative while in debt); inf when unlimited."""
        if self._rate is None:
            return math.inf
        self._refill()
        return self._tokens

    def set_rate(self, rate: float | None, burst: int | None = None) -> None:
        """Change the rate (and optionally the burst) now; waiting callers re-plan at once."""
        if rate is not None and (rate < 0 or not math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number >= 0 bytes/s or None, not {rate}")
        if burst is not None:
            if burst < 1:
                raise ValueError(f"burst must be at least 1 byte, not {burst}")
            self._fixed_burst = burst
        self._refill()  # tokens earned so far were earned at the old rate
        was_unlimited = self._rate is None
        self._rate = rate
        if rate is None:
            self._burst = self._fixed_burst or 0
        else:
            self._burst = self._fixed_burst or default_burst(rate)
            if was_unlimited:
                self._tokens = float(self._burst)  # a limit starts with a full bucket
            if rate == 0:
                self._tokens = min(self._tokens, 0.0)  # paused means now, not after the burst
            self._tokens = min(self._tokens, float(self._burst))
        for wake in self._listeners:
            wake()

    def add_listener(self, wake: Callable[[], None]) -> None:
        """Call `wake` after every rate change (gates use it to re-arm their timers)."""
        self._listeners.append(wake)

    def remove_listener(self, wake: Callable[[], None]) -> None:
        self._listeners.remove(wake)

    def _refill(self) -> None:
        now = self._clock()
        if self._rate:
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(float(self._burst), self._tokens + elapsed * self._rate)
        self._stamp = now

    def try_take(self, n: int) -> bool:
        """Pay for `n` bytes if the bucket can now (see the class docstring); never waits."""
        if n < 0:
            raise ValueError(f"cannot take {n} bytes")
        if self._rate is None:
            self.bytes_total += n
            return True
        self._refill()
        if self._tokens + _SLACK >= min(n, self._burst):
            self._tokens -= n
            self.bytes_total += n
            return True
        return False

    def delay_for(self, n: int) -> float:
        """Seconds until `try_take(n)` can succeed at the current rate (inf when paused)."""
        if self._rate is None:
            return 0.0
        self._refill()
        short = min(n, self._burst) - self._tokens
        if short <= _SLACK:
            return 0.0
        return short / self._rate if self._rate else math.inf

    def now(self) -> float:
        return self._clock()

    async def consume(self, n: int) -> None:
        """Wait until `n` bytes are paid for; callers are served in arrival order."""
        await self._fifo.wait(0, n)


class TokenGate:
    """Callers waiting on one bucket, served in (key, arrival) order.

    Only the first waiter matters at any moment: when the bucket can pay it, it is
    granted and the next one is considered; otherwise one timer is armed for when the
    bucket will be able to. A newcomer with a smaller key goes ahead of everyone (that
    is how FairShare reorders), and re-arms the timer for its own size.

    `vtime` is the largest key granted so far (FairShare's virtual time).
    A caller cancelled while waiting leaves its entry behind, skipped when reached;
    one cancelled just after its grant has used its tokens (they are not refunded).
    """

    def __init__(self, bucket: TokenBucket) -> None:
        self._bucket = bucket
        self._heap: list[tuple[float, int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self.vtime = 0.0
        bucket.add_listener(self.pump)

    def __len__(self) -> int:
        """Callers waiting (cancelled ones not yet skipped included)."""
        return len(self._heap)

    async def wait(self, key: float, n: int) -> float:
        """Wait for the turn of (`key`, arrival) and for `n` tokens; the seconds waited."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._heap, (key, next(self._arrivals), n, fut))
        self.pump()
        if fut.done():  # paid without waiting: no suspension, no cost beyond the heap
            return 0.0
        started = self._bucket.now()
        try:
            await fut
        finally:
            waited = max(0.0, self._bucket.now() - started)
            self._bucket.waited_seconds += waited
            if fut.cancelled():
                self.pump()  # it may have been first: let the next one go
        return waited

    def pump(self) -> None:
        """Grant every waiter the bucket can pay, in order; arm a timer for the next."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._heap
        while heap:
            key, _, n, fut = heap[0]
            if fut.done():  # cancelled while waiting
                heapq.heappop(heap)
                continue
            if not self._bucket.try_take(n):
                delay = self._bucket.delay_for(n)
                if math.isfinite(delay):  # inf = paused: the next set_rate pumps us
                    delay = max(delay, MIN_TIMER)
                    self._timer = fut.get_loop().call_later(delay, self.pump)
                return
            heapq.heappop(heap)
            self.vtime = max(self.vtime, key)
            fut.set_result(None)

    def close(self) -> None:
        """Stop listening to the bucket (the waiters, if any, stay waiting)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._bucket.remove_listener(self.pump)


# -- per-disk fairness ------------------------------------------------------------------

DEFAULT_CREDIT = 1024 * 1024


class FairShare:
    """Byte-fair access of many disks to one `TokenBucket`: equal bytes, whatever the frames.

    `acquire(disk_id, n)` returns when it is this disk's turn and `n` bytes are paid.
    A disk can have several requests waiting; they are served in its order.

    Algorithm: start-time fair queueing (Goyal, Vin & Cheng, SIGCOMM 1996) by bytes -
    the virtual-time form of deficit round robin - with a cap on saved-up credit.

    - Each disk has a finish tag F (bytes of virtual service it has had). A request of
      n bytes gets the start tag S = max(F, V - credit) and moves F to S + n.
    - Among the waiting requests the smallest S goes next (ties: arrival order), as
      soon as the bucket can pay it. V, the virtual time, is the largest S granted.

    A disk that keeps sending advances its tags by exactly the bytes it sends, and the
    disk served least in bytes is always first: backlogged disks get equal bytes within
    about one frame of each other, whether one sends 4 MiB frames and another 16 KiB
    ones. A disk back from idle starts at S >= V - credit: at most `credit` bytes of
    catching up however long it was away, never an idle period's worth of saved turns.

    Why not round-robin DRR with a per-visit quantum: the forwarder holds one frame per
    disk at a time, and DRR drops a flow's remaining quantum whenever its queue is
    momentarily empty - a small-frame disk then sends one small frame per round while
    a big-frame disk sends a quantum, and shares follow frame sizes. Here the turn is
    decided when the tokens are there, not when the previous frame was granted, so a
    disk that re-requests a moment later is back in the running, and `credit` forgives
    short gaps between its frames. Fairness needs contention: with an unlimited or idle
    bucket every request is paid on arrival.

    Per-disk statistics: `bytes_by_disk` paid, `waited_by_disk` seconds spent waiting.
    """

    def __init__(self, bucket: TokenBucket, credit: int = DEFAULT_CREDIT) -> None:
        if credit < 0:
            raise ValueError(f"credit must be >= 0 bytes, not {credit}")
        self.bucket = bucket
        self.credit = credit
        self._gate = TokenGate(bucket)
        self._finish: dict[str, float] = {}
        self.bytes_by_disk: dict[str, int] = {}
        self.waited_by_disk: dict[str, float] = {}

    @property
    def rate(self) -> float | None:
        return self.bucket.rate

    def set_rate(self, rate: float | None, burst: int | None = None) -> None:
        """The bucket's `set_rate`: waiting disks re-plan at once."""
        self.bucket.set_rate(rate, burst)

    @property
    def vtime(self) -> float:
        return self._gate.vtime

    def waiting(self) -> int:
        """Requests waiting now."""
        return len(self._gate)

    def _tag(self, disk_id: str, n: int) -> float:
        floor = self._gate.vtime - self.credit
        start = max(self._finish.get(disk_id, floor), floor)
        self._finish[disk_id] = start + n
        return start

    async def acquire(self, disk_id: str, n: int) -> None:
        """Wait for `disk_id`'s turn and for `n` tokens."""
        if n < 0:
            raise ValueError(f"cannot acquire {n} bytes")
        # The tag is fixed on arrival: if the caller is cancelled, the disk has still
        # spent that virtual time (it loses a turn's worth of priority, nothing else).
        waited = await self._gate.wait(self._tag(disk_id, n), n)
        self.bytes_by_disk[disk_id] = self.bytes_by_disk.get(disk_id, 0) + n
        if waited:
            self.waited_by_disk[disk_id] = self.waited_by_disk.get(disk_id, 0.0) + waited

    def remove(self, disk_id: str) -> None:
        """Forget a disk (closed or moved): its tags and statistics.

        Requests of that disk still waiting keep their places; a later request starts
        like a new disk's, at V - credit.
        """
        self._finish.pop(disk_id, None)
        self.bytes_by_disk.pop(disk_id, None)
        self.waited_by_disk.pop(disk_id, None)

    def forget_idle(self) -> int:
        """Drop disks whose tags no longer matter (F <= V - credit behaves like a new disk).

        Bounds the memory of a long-running server whose disks come and go without
        `remove`; statistics stay. Returns how many were dropped.
        """
        floor = self._gate.vtime - self.credit
        idle = [disk for disk, finish in self._finish.items() if finish <= floor]
        for disk in idle:
            del self._finish[disk]
        return len(idle)

    def close(self) -> None:
        self._gate.close()
