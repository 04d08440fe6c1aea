"""The agent's part in consistency-group points: when it tries (`GroupTagger`) and what
the configuration server's barrier tells it (`BarrierClient`, `frozen_barrier`).

The barrier runs against the real configuration server endpoint over TLS (the
in-process configd of tests/config/test_endpoint.py, agents enrolled through it); the
only fault injected is a server that never answers. The freeze is the real bounded
freeze of `agent.quiesce` (with no filesystems, so no root is needed): the group tag is
only worth anything if the barrier's answer comes while it still holds.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.discovery import Disk, Mount
from agent.group_tag import BarrierClient, GroupTagger, frozen_barrier
from agent.quiesce import freeze
from agent.replicator import BARRIER_MARGIN, Replicator
from agent.replicator_disk import AckRelay
from agent.trackers.tracefs import TracefsTracker
from appliance.wire.enrol import enrol
from appliance.wire.sender import StreamSender
from tests.config.test_endpoint import Configd, configd, tls_of

# -- when the members try --------------------------------------------------------------


def tagger(interval: float = 300.0, request_at: int | None = None) -> GroupTagger:
    t = GroupTagger(BarrierClient("localhost", 1, None, "db1"), lambda: None)  # type: ignore[arg-type]
    t.group, t.interval, t.request_at = "erp", interval, request_at
    return t


def test_slots_are_wall_clock_multiples_of_the_interval() -> None:
    t = tagger(300)
    assert t.next_slot(1000.0) == 1200
    assert t.next_slot(1200.0) == 1500  # a slot that is now is past
    assert tagger(7.5).next_slot(100.0) == 105  # the same int on every member


def test_an_on_demand_point_comes_first_and_only_once() -> None:
    t = tagger(300, request_at=1100)
    assert t.next_slot(1000.0) == 1100
    asyncio.run(t._round("erp", 1100))  # no replicator: the slot is still spent
    assert t.last == {"slot": 1100, "tag": None, "reason": "not replicating",
                      "freeze_seconds": None}  # fmt: skip
    assert t.next_slot(1000.0) == 1200  # not again
    assert tagger(300, request_at=1300).next_slot(1000.0) == 1200  # the interval's is sooner
    assert tagger(300, request_at=900).next_slot(1000.0) == 1200  # a past request is ignored


def test_a_clock_set_back_never_repeats_a_slot() -> None:
    t = tagger(300)
    asyncio.run(t._round("erp", 1200))
    # The target keeps a tag id's first point: slot 1200 again would mix two instants.
    assert t.next_slot(1000.0) == 1500


def test_the_schedule_runs_and_follows_the_answers() -> None:
    async def scenario() -> list[int]:
        t = GroupTagger(BarrierClient("localhost", 1, None, "db1"), lambda: None)  # type: ignore[arg-type]
        seen: list[int] = []
        t.update({"name": "erp", "interval_s": 1})
        try:
            async with asyncio.timeout(10):
                while len(seen) < 2:
                    if t.last and t.last["slot"] not in seen:
                        seen.append(t.last["slot"])
                    await asyncio.sleep(0.01)
            t.update({})  # left the group: the schedule stops
            assert t.group is None and t._task is None
        finally:
            await t.close()
        return seen

    first, second = asyncio.run(scenario())
    assert second > first  # whole seconds, one round each (a loaded machine may skip one)


# -- the barrier ---------------------------------------------------------------------------


@asynccontextmanager
async def members(
    tmp_path: Path, *names: str
) -> AsyncIterator[tuple[Configd, list[BarrierClient]]]:
    """configd with the agents `names` enrolled and in group erp; their barrier clients."""
    async with configd(tmp_path) as cd:
        clients = []
        for name in names:
            agent = await enrol("127.0.0.1", cd.port, cd.passphrase, name=name, kind="agent",
                                sans=[], facts={"disks": []})  # fmt: skip
            ctx = tls_of(agent, tmp_path / name, "agent")
            clients.append(BarrierClient("localhost", cd.port, ctx, name))
        await cd.service.set_group("erp", {"add": list(names[:2])})
        try:
            yield cd, clients
        finally:
            for client in clients:
                client.close()


def test_all_members_frozen_get_the_group_tag(tmp_path: Path) -> None:
    async def scenario() -> tuple[Any, dict[str, Any]]:
        async with members(tmp_path, "db1", "app1") as (_, (db1, app1)):
            answers: list[dict[str, Any]] = []
            hook = frozen_barrier(db1, "erp", 600, asyncio.get_running_loop(), answers)

            def capture() -> str | None:
                with freeze([], 5.0) as handle:
                    return hook(handle.remaining() - BARRIER_MARGIN)

            return await asyncio.gather(asyncio.to_thread(capture),
                                        app1.barrier("erp", 600, 4.0))  # fmt: skip

    tag, other = asyncio.run(scenario())
    assert tag == "group:erp:600"
    assert other == {"ok": True, "tag": "group:erp:600"}


def test_a_missed_or_refused_barrier_means_the_machines_own_tag(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with members(tmp_path, "db1", "app1", "web1") as (cd, (db1, _, web1)):
            alone = await db1.barrier("erp", 600, 1.0)
            stranger = await web1.barrier("erp", 600, 1.0)
            again = await db1.barrier("erp", 900, 1.0)  # the connection is still good
            events = [e for e in cd.inventory.events(20) if e["kind"] == "group-point-missed"]
            assert len(events) == 2 and all("app1" in e["message"] for e in events)
            return alone, stranger, again

    alone, stranger, again = asyncio.run(scenario())
    assert alone == {"ok": False, "reason": "missed: app1 not frozen"}
    assert stranger == {"ok": False, "reason": "refused: web1 is not a member of group erp"}
    assert again == {"ok": False, "reason": "missed: app1 not frozen"}


def test_an_unreachable_server_means_the_machines_own_tag(tmp_path: Path, port: int) -> None:
    async def scenario() -> dict[str, Any]:
        async with members(tmp_path, "db1") as (_, (db1,)):
            gone = BarrierClient("localhost", port, db1._ssl, "db1")  # nothing listens
            return await gone.barrier("erp", 600, 1.0)

    answer = asyncio.run(scenario())
    assert answer["ok"] is False and answer["reason"].startswith("no answer: ")


def test_a_server_answering_too_late_cannot_stretch_the_freeze(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> tuple[str | None, list[dict[str, Any]], dict[str, Any]]:
        async with members(tmp_path, "db1", "app1") as (cd, (db1, app1)):
            real = cd.service.group_barrier

            async def late(member: str, kind: Any, params: dict[str, Any]) -> Any:
                answer = await real(member, kind, params)
                await asyncio.sleep(5)  # the fault: the answer comes after the bound
                return answer

            monkeypatch.setattr(cd.service, "group_barrier", late)
            answers: list[dict[str, Any]] = []
            hook = frozen_barrier(db1, "erp", 600, asyncio.get_running_loop(), answers)

            def capture() -> str | None:
                # Raises FreezeTimeout (no point at all) if the hook outlives the bound.
                with freeze([], 0.8) as handle:
                    return hook(max(0.0, handle.remaining() - BARRIER_MARGIN))

            tag, _ = await asyncio.gather(asyncio.to_thread(capture),
                                          app1.barrier("erp", 600, 0.5))  # fmt: skip
            monkeypatch.setattr(cd.service, "group_barrier", real)
            # The stale answer is never read as the next round's: a fresh connection.
            both = await asyncio.gather(db1.barrier("erp", 900, 4.0),
                                        app1.barrier("erp", 900, 4.0))  # fmt: skip
            return tag, answers, both[0]

    tag, answers, next_round = asyncio.run(scenario())
    assert tag is None  # the machine's own tag, inside its bound
    assert answers[0]["ok"] is False
    assert next_round == {"ok": True, "tag": "group:erp:900"}


def test_a_stuck_event_loop_cannot_stretch_the_freeze(tmp_path: Path) -> None:
    async def scenario() -> tuple[str | None, list[dict[str, Any]]]:
        async with members(tmp_path, "db1", "app1") as (_, (db1, _app1)):
            loop = asyncio.get_running_loop()
            answers: list[dict[str, Any]] = []
            hook = frozen_barrier(db1, "erp", 600, loop, answers)

            def capture() -> str | None:
                with freeze([], 0.8) as handle:
                    # The fault: the loop blocks (e.g. a write to a frozen filesystem),
                    # so neither the answer nor the client's own timeout can come.
                    loop.call_soon_threadsafe(time.sleep, 1.5)
                    return hook(max(0.0, handle.remaining() - BARRIER_MARGIN))

            return await asyncio.to_thread(capture), answers  # FreezeTimeout if overrun

    tag, answers = asyncio.run(scenario())
    assert tag is None
    assert answers == [{"ok": False, "reason": "no answer within the freeze bound"}]


# -- the replicator's side -----------------------------------------------------------------


def replicator(tmp_path: Path, *, mounted: bool) -> Replicator:
    """A real Replicator over a loop-like disk, not started (nothing here needs the stream)."""
    tmp_path.mkdir(exist_ok=True)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    mounts = (Mount(tmp_path, "ext4", "/dev/loop99", "loop99", "/", False),) if mounted else ()
    disk = Disk("loop99", image, 7, 99, 1 << 20, 512, 512, False, False, False,
                backing_file=str(image), mounts=mounts)  # fmt: skip
    acks = AckRelay()
    sender = StreamSender("127.0.0.1", 1, ssl.create_default_context(), name="db1", on_ack=acks)
    return Replicator([disk], sender, TracefsTracker, tmp_path / "state", machine_id="db1",
                      acks=acks)  # fmt: skip


def test_a_disk_no_freeze_holds_never_arrives_at_the_barrier(tmp_path: Path) -> None:
    # Its writes go on during the "freeze": arriving would vouch for an instant it was
    # not held at (the other members' data could depend on writes its point lacks).
    rep = replicator(tmp_path, mounted=False)
    assert rep.unheld_disks() == ["loop99"]
    assert replicator(tmp_path / "m", mounted=True).unheld_disks() == []
    rep.phase = "replicating"
    t = GroupTagger(BarrierClient("localhost", 1, None, "db1"), lambda: rep)  # type: ignore[arg-type]
    asyncio.run(t._round("erp", 600))
    assert t.last["reason"] == "no mounted filesystem to freeze on loop99"
    assert rep._group_wanted is None  # no freeze was even asked for


def test_a_round_given_up_does_not_break_the_next_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        rep = replicator(tmp_path, mounted=True)
        first = asyncio.create_task(rep.group_point(lambda wait: None))
        await asyncio.sleep(0)
        first.cancel()  # e.g. the machine left its group mid-round
        await asyncio.gather(first, return_exceptions=True)
        second = asyncio.create_task(rep.group_point(lambda wait: None))
        await asyncio.sleep(0)
        assert not second.done(), second.exception()  # waits for the delta loop
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)

    asyncio.run(scenario())


def test_an_answers_request_is_taken_at_its_time() -> None:
    async def scenario() -> tuple[int, dict[str, Any]]:
        t = GroupTagger(BarrierClient("localhost", 1, None, "db1"), lambda: None)  # type: ignore[arg-type]
        at = int(time.time()) + 2
        t.update({"name": "erp", "interval_s": 3600, "request_at": at})
        try:
            async with asyncio.timeout(30):
                while not t.last:
                    await asyncio.sleep(0.01)
        finally:
            await t.close()
        return at, t.last

    at, last = asyncio.run(scenario())
    assert last["slot"] == at  # not the hour's slot
