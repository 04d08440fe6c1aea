"""This machine's part in its consistency group's common points (see
`appliance.config.groups` for why they form a consistent cut).

The configuration server's report answers carry ``{"group": {"name", "interval_s",
"request_at"}}`` while the machine is in a group. At every wall-clock multiple of
`interval_s` (and at an on-demand `request_at`) the `GroupTagger` asks the replicator
for a point whose capture, while frozen, calls `group_barrier(group, slot, wait)` on
the configuration server over a connection of its own (a report in flight never
delays a frozen member). "ok" means every member is frozen now: the tag id is the
group's. Anything else — missed, refused, no answer within `wait`, the server gone —
means this machine's own tag id instead, so the round still yields a point, and the
freeze never outlives its bound (`agent.quiesce`): the wait is what is left of it, and
the capture thread stops waiting then even if the event loop is stuck (a late answer
would come after the thaw: no point at all). The server is asked to answer a little
earlier (REPLY_MARGIN), so a "missed" reaches us as such. A machine with a disk that
no freeze holds (no mounted filesystem) does not take part: the group misses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from agent.replicator import GroupBarrier, Replicator
from appliance.wire.connection import Connection, open_connection
from appliance.wire.errors import WireError
from appliance.wire.messages import Hello, Request, Response, Welcome

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
#: The server is asked to answer this much before our own deadline (the reply's trip):
#: a "missed" then arrives as such, on a connection still good for the next round.
REPLY_MARGIN = 0.1
MIN_INTERVAL = 1.0


class BarrierClient:
    """One lazily opened connection to the configuration server for `group_barrier`."""

    def __init__(
        self, host: str, port: int, ssl_context: ssl.SSLContext, name: str, role: str = "agent"
    ) -> None:
        self.host, self.port, self.name, self.role = host, port, name, role
        self._ssl = ssl_context
        self._conn: Connection | None = None
        self._request_id = 0

    async def connect(self) -> Connection:
        if self._conn is None:
            conn = await open_connection(
                self.host, self.port, self._ssl, server_hostname=self.host, timeout=CONNECT_TIMEOUT
            )
            try:
                await conn.send(Hello(self.role, self.name))
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    welcome = await conn.recv()
                if not isinstance(welcome, Welcome):
                    raise WireError(f"expected WELCOME, got {type(welcome).__name__}")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def barrier(self, group: str, slot: int, wait: float) -> dict[str, Any]:
        """The server's answer, or {"ok": False, "reason"} if it gave none in time."""
        try:
            # No slack past `wait`: the caller is frozen, and its bound is what is left.
            async with asyncio.timeout(wait):
                conn = await self.connect()
                self._request_id += 1
                answer_by = max(0.0, wait - min(REPLY_MARGIN, wait / 4))
                params = {"group": group, "slot": slot, "wait": answer_by}
                await conn.send(
                    Request(self._request_id, "group_barrier", json.dumps(params).encode())
                )
                while True:
                    reply = await conn.recv()
                    if isinstance(reply, Response) and reply.request_id == self._request_id:
                        break
            result = reply.json()
            if not reply.ok or not isinstance(result, dict):
                message = result.get("message") if isinstance(result, dict) else result
                return {"ok": False, "reason": f"refused: {message}"}
            return result
        except (OSError, TimeoutError, WireError) as exc:
            # The answer may still come: this connection's next reply would be stale.
            self.close()
            return {"ok": False, "reason": f"no answer: {str(exc) or type(exc).__name__}"}
        except asyncio.CancelledError:  # the frozen caller gave up first: same reason
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def frozen_barrier(
    client: BarrierClient,
    group: str,
    slot: int,
    loop: asyncio.AbstractEventLoop,
    answers: list[dict[str, Any]],
) -> GroupBarrier:
    """The replicator's barrier for one round: called in the capture thread, frozen,
    with the seconds it may wait; the group's tag id if every member was frozen with
    it, None for this machine's own. It returns within `wait` whatever the server or
    the event loop do (a late "ok" would come after the thaw: no point at all)."""

    def barrier(wait: float) -> str | None:
        future = asyncio.run_coroutine_threadsafe(client.barrier(group, slot, wait), loop)
        try:
            answer = future.result(wait)
        except (TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            answer = {"ok": False, "reason": "no answer within the freeze bound"}
        answers.append(answer)
        tag = answer.get("tag")
        return tag if answer.get("ok") and isinstance(tag, str) else None

    return barrier


class GroupTagger:
    """Schedules the group points; `update` with each answer's "group" part."""

    def __init__(self, client: BarrierClient, replicator: Callable[[], Replicator | None]) -> None:
        self.client = client
        self._replicator = replicator
        self.group: str | None = None
        self.interval = 300.0
        self.request_at: int | None = None
        self.last: dict[str, Any] = {}  # the newest round: slot, tag or reason
        self._done_slots: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def update(self, answer: Any) -> None:
        name = answer.get("name") if isinstance(answer, dict) else None
        if not isinstance(name, str) or not name:
            self.group = None
            self._stop()
            return
        interval = answer.get("interval_s")
        request = answer.get("request_at")
        before = (self.group, self.interval, self.request_at)
        self.group = name
        if isinstance(interval, int | float) and interval >= MIN_INTERVAL:
            self.interval = float(interval)
        self.request_at = request if isinstance(request, int) else None
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        elif before != (self.group, self.interval, self.request_at):
            self._changed.set()

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.client.close()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.client.close()

    def next_slot(self, now: float) -> int:
        """The next slot after `now` (Unix seconds): a multiple of the interval, or the
        requested time if that comes first and was not taken yet."""
        slot = int((now // self.interval + 1) * self.interval)
        at = self.request_at
        if at is not None and now < at < slot and at not in self._done_slots:
            slot = at
        # Never a slot again (a clock set back): the target keeps a tag id's first point.
        newest = max(self._done_slots, default=0)
        return slot if slot > newest else int(newest + self.interval)

    async def _run(self) -> None:
        while self.group is not None:
            slot = self.next_slot(time.time())
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, slot - time.time())):
                    await self._changed.wait()
                    continue  # new settings: schedule again
            await self._round(self.group, slot)

    async def _round(self, group: str, slot: int) -> None:
        self._done_slots = {s for s in self._done_slots if s > slot - 3600} | {slot}
        rep = self._replicator()
        if rep is None or rep.phase != "replicating":
            self.last = {"slot": slot, "tag": None, "reason": "not replicating",
                         "freeze_seconds": None}  # fmt: skip
            return
        if unheld := rep.unheld_disks():
            # Its writes would go on while "frozen": the group's instant would be a lie.
            why = f"no mounted filesystem to freeze on {', '.join(unheld)}"
            self.last = {"slot": slot, "tag": None, "reason": why, "freeze_seconds": None}
            log.warning("group %s: no group point for slot %d: %s", group, slot, why)
            return
        # A fresh connection, before the freeze: no TLS handshake on the frozen clock,
        # and none left idle since the last round (a NAT may have dropped it silently).
        self.client.close()
        with contextlib.suppress(OSError, TimeoutError, WireError):
            await self.client.connect()  # if not, the barrier tries once more, bounded
        answers: list[dict[str, Any]] = []
        barrier = frozen_barrier(self.client, group, slot, asyncio.get_running_loop(), answers)
        taken = await rep.group_point(barrier)
        reason = answers[0].get("reason") if answers else "no consistent capture this round"
        ok = taken is not None and taken.startswith("group:")
        froze = max((s.get("last_freeze_seconds") or 0.0 for s in rep.status().values()
                     if s.get("last_tag_id") == taken), default=None)  # fmt: skip
        self.last = {"slot": slot, "tag": taken if ok else None,
                     "reason": None if ok else reason, "freeze_seconds": froze}  # fmt: skip
        if ok:
            log.info("group %s: point %s taken (frozen %.3f s)", group, taken, froze or 0.0)
        else:
            log.warning("group %s: no group point for slot %d: %s", group, slot, reason)
