"""The sender: the window in memory, then whole streams over real TLS with cuts and restarts.

Every stream test ends by checking that the receiver applied exactly the submitted
sequence, contiguous, nothing twice, with the right bytes, and never had to refuse
anything (a window overrun or a gap would have been counted).
"""

from __future__ import annotations

import asyncio
import random
import ssl

import pytest

from appliance.wire.connection import ConnectionState
from appliance.wire.errors import ConnectionClosed, ErrorCode, PeerError
from appliance.wire.messages import Data, DigestReply, DigestRequest, Tag, TagKind
from appliance.wire.reconnect import Backoff
from appliance.wire.sender import OutboundWindow, StreamSender
from tests.conftest import free_port
from tests.wire.conftest import Runner
from tests.wire.probe import eventually
from tests.wire.receiver import Receiver

KIB = 1024


def data(seq: int, size: int = 4 * KIB, disk: str = "d0") -> Data:
    return Data.raw(disk, seq, seq * size, bytes([seq % 251]) * size)


def tag(seq: int, disk: str = "d0") -> Tag:
    return Tag(disk, seq, f"t{seq}", TagKind.CRASH, seq)


def stream(n: int, disk: str = "d0") -> list[Data | Tag]:
    """n messages: DATA with a crash TAG every tenth and at the end."""
    return [tag(s, disk) if s % 10 == 0 or s == n else data(s, disk=disk) for s in range(1, n + 1)]


# -- OutboundWindow, in memory ---------------------------------------------------------


def test_window_admits_until_full_and_ack_makes_room() -> None:
    async def scenario() -> None:
        window = OutboundWindow(16 * KIB)
        for seq in range(1, 5):
            await window.put(data(seq))
        assert window.unacked_bytes == 16 * KIB
        blocked = asyncio.create_task(window.put(data(5)))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        window.ack(2)
        await asyncio.wait_for(blocked, 1)
        assert [m.seq for m in window.unacked()] == [3, 4, 5]
        assert window.acked_seq == 2
        assert window.unacked_bytes == 12 * KIB

    asyncio.run(scenario())


def test_window_admits_one_oversized_message_when_empty() -> None:
    async def scenario() -> None:
        window = OutboundWindow(8 * KIB)
        await asyncio.wait_for(window.put(data(1, size=64 * KIB)), 1)  # alone: admitted
        blocked = asyncio.create_task(window.put(data(2, size=KIB)))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        window.ack(1)
        await asyncio.wait_for(blocked, 1)

    asyncio.run(scenario())


def test_window_bounds_message_count_and_checks_contiguity() -> None:
    async def scenario() -> None:
        window = OutboundWindow(1 << 30, max_messages=3)
        for seq in (1, 2, 3):
            await window.put(tag(seq))  # tags cost no bytes, yet the count is bounded
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(window.put(tag(4)), 0.05)
        with pytest.raises(ValueError, match="contiguous"):
            await window.put(tag(7))

    asyncio.run(scenario())


def sendable(window: OutboundWindow, limit: int) -> list[int]:
    """Sequences the sender may put on the wire now, in order (marking them sent)."""
    seqs = []
    while (msg := window.next_to_send(limit)) is not None:
        # A digest request shows as minus its id: it has no sequence of its own.
        seqs.append(-msg.request_id if isinstance(msg, DigestRequest) else msg.seq)
    return seqs


def digest_request(request_id: int, disk: str = "d0") -> DigestRequest:
    return DigestRequest(disk, request_id, 64 * KIB, (0, 1, 2))


def test_window_keeps_a_request_in_order_until_answered() -> None:
    async def scenario() -> None:
        window = OutboundWindow(1 << 20)
        for seq in (1, 2):
            await window.put(data(seq))
        await window.put_request(digest_request(7))
        for seq in (3, 4):
            await window.put(data(seq))
        assert sendable(window, 1 << 20) == [1, 2, -7, 3, 4]
        assert window.inflight_bytes == 16 * KIB
        window.ack(1)
        window.rewind()  # cut: the request goes again, still after 2 and before 3
        assert sendable(window, 1 << 20) == [2, -7, 3, 4]
        window.ack(3)  # the frames around it are durable; its reply is not in yet
        assert [m.request_id for m in window.requests()] == [7]
        assert [m.seq for m in window.unacked()] == [4]
        assert window.inflight_bytes == 4 * KIB and window.unacked_bytes == 4 * KIB
        assert sendable(window, 1 << 20) == []  # the cursor still counts it as sent
        window.rewind()
        assert sendable(window, 1 << 20) == [-7, 4]  # only what follows the ACK, in order
        assert window.remove_request(7)
        assert not window.remove_request(7)
        window.rewind()
        assert sendable(window, 1 << 20) == [4]
        window.ack(4)
        assert len(window) == 0 and window.inflight_bytes == 0

    asyncio.run(scenario())


def test_window_admits_a_large_frame_behind_an_unanswered_request() -> None:
    async def scenario() -> None:
        window = OutboundWindow(8 * KIB, max_messages=2)
        await window.put_request(digest_request(1))
        await asyncio.wait_for(window.put(data(1, size=64 * KIB)), 1)  # no frame waits
        blocked = asyncio.create_task(window.put_request(digest_request(2)))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # the count bounds requests too
        window.remove_request(1)
        await asyncio.wait_for(blocked, 1)

    asyncio.run(scenario())


def test_window_cursor_sends_in_order_within_a_limit_and_rewinds() -> None:
    async def scenario() -> None:
        window = OutboundWindow(1 << 20)
        for seq in range(1, 6):
            await window.put(data(seq))
        assert sendable(window, 12 * KIB) == [1, 2, 3]  # 12 KiB in flight is the limit
        assert window.inflight_bytes == 12 * KIB
        window.ack(2)
        assert window.inflight_bytes == 4 * KIB
        assert sendable(window, 12 * KIB) == [4, 5]
        window.rewind()  # a new connection: resend everything after the ACK
        assert sendable(window, 1 << 20) == [3, 4, 5]
        window.ack(9)  # the receiver is further than we ever sent: all gone
        assert len(window) == 0 and window.inflight_bytes == 0

    asyncio.run(scenario())


def test_window_failure_releases_every_waiter() -> None:
    async def scenario() -> None:
        window = OutboundWindow(4 * KIB)
        await window.put(data(1))
        put = asyncio.create_task(window.put(data(2)))
        acked = asyncio.create_task(window.wait_acked(1))
        await asyncio.sleep(0.01)
        window.fail(ConnectionClosed("gone"))
        for task in (put, acked):
            with pytest.raises(ConnectionClosed):
                await task

    asyncio.run(scenario())


# -- StreamSender over TLS -------------------------------------------------------------


def make_sender(port: int, ctx: ssl.SSLContext, *, keepalive: float = 15.0) -> StreamSender:
    backoff = Backoff(initial=0.02, maximum=0.2, rng=random.Random(7))
    sender = StreamSender(
        "127.0.0.1", port, ctx, name="ps-test", backoff=backoff, keepalive=keepalive
    )
    sender.add_disk("d0", "m0", 1 << 30)
    return sender


def check_exact(receiver: Receiver, msgs: list[Data | Tag], disk: str = "d0") -> None:
    state = receiver.disks[disk]
    assert state.applied == [m.seq for m in msgs]  # contiguous, in order, nothing twice
    for m in msgs:
        if isinstance(m, Data):
            assert state.payloads[m.seq] == m.payload
    assert receiver.counters.total() == 0, receiver.counters.snapshot()


@pytest.mark.integration
def test_stream_resends_from_the_ack_after_cuts(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        # Acks every 4th message and reports only acked data as durable, so every cut
        # makes the sender replay messages the receiver applied: they must be ignored.
        receiver = Receiver(
            server_ctx, ack_every=4, report_acked_as_durable=True, drop_at=(23, 61, 62, 130)
        )
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx)
        await sender.start()
        msgs = stream(150)
        for msg in msgs:
            await sender.submit(msg)
        await sender.wait_acked("d0", 150, timeout=20)
        check_exact(receiver, msgs)
        assert receiver.disks["d0"].duplicates > 0
        assert sender.reconnects >= 3 and receiver.connections >= 4
        assert sender.acked_seq("d0") == 150
        assert len(sender.window("d0")) == 0
        await sender.close()
        assert sender.state is ConnectionState.CLOSED
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_stream_survives_a_receiver_restart_and_waits_while_disconnected(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        port = free_port()
        receiver = Receiver(server_ctx)
        sender = make_sender(port, client_ctx)
        await sender.start()  # nobody listens yet
        msgs = stream(120)
        for msg in msgs[:10]:
            await sender.submit(msg)  # queued in the window while disconnected
        await asyncio.sleep(0.2)
        assert sender.state is ConnectionState.CONNECTING
        assert sender.acked_seq("d0") == 0
        await receiver.start(port)
        for msg in msgs[10:60]:
            await sender.submit(msg)
        await sender.wait_acked("d0", 60, timeout=10)
        await receiver.stop()  # the target restarts: connection gone, state kept
        for msg in msgs[60:70]:
            await sender.submit(msg)
        await asyncio.sleep(0.2)
        await receiver.start(port)
        for msg in msgs[70:]:
            await sender.submit(msg)
        await sender.wait_acked("d0", 120, timeout=10)
        check_exact(receiver, msgs)
        assert sender.reconnects >= 2
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_submit_is_bounded_by_the_receivers_window(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        receiver = Receiver(server_ctx, window_bytes=64 * KIB, acks=False)
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx)  # its own default is 8 MiB
        await sender.start()
        await eventually(lambda: sender.state is ConnectionState.OPEN)
        assert sender.window("d0").window_bytes == 64 * KIB  # adopted from WELCOME
        for seq in range(1, 17):
            await asyncio.wait_for(sender.submit(data(seq)), 1)  # 16 x 4 KiB = the window
        blocked = asyncio.create_task(sender.submit(data(17)))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        assert sender.window("d0").unacked_bytes == 64 * KIB
        await eventually(lambda: receiver.disks["d0"].applied_seq == 16)
        receiver.release_acks()
        await asyncio.wait_for(blocked, 5)
        await sender.submit(tag(18))
        await sender.wait_acked("d0", 18, timeout=5)
        check_exact(receiver, [data(s) for s in range(1, 18)] + [tag(18)])
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_two_disks_share_one_connection(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        receiver = Receiver(server_ctx, drop_at=(50,))
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx)
        sender.add_disk("d1", "m0", 1 << 30)
        await sender.start()
        a, b = stream(60, "d0"), stream(60, "d1")

        async def feed(msgs: list[Data | Tag]) -> None:
            for msg in msgs:
                await sender.submit(msg)

        await asyncio.gather(feed(a), feed(b))
        await sender.wait_acked("d0", 60, timeout=10)
        await sender.wait_acked("d1", 60, timeout=10)
        check_exact(receiver, a, "d0")
        check_exact(receiver, b, "d1")
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_a_fatal_refusal_reaches_the_caller_instead_of_looping(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        receiver = Receiver(server_ctx, refuse={"bad": ErrorCode.UNKNOWN_DISK})
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx)
        sender.add_disk("bad", "m0", 1 << 20)
        await sender.start()
        await sender.submit(data(1, disk="bad"))
        with pytest.raises(PeerError) as info:
            await sender.wait_acked("bad", 1, timeout=5)
        assert info.value.code is ErrorCode.UNKNOWN_DISK
        with pytest.raises(PeerError):
            await sender.submit(data(2, disk="bad"))
        assert sender.state is ConnectionState.CLOSED
        assert sender.reconnects == 0
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_a_transient_refusal_is_retried(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        receiver = Receiver(server_ctx, storage_failures=2)  # e.g. a full datastore
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx)
        await sender.start()
        msgs = stream(30)
        for msg in msgs:
            await sender.submit(msg)
        await sender.wait_acked("d0", 30, timeout=10)
        assert sender.reconnects == 2
        assert receiver.counters.get(ErrorCode.STORAGE_FAILURE) == 2
        receiver.counters.count(ErrorCode.STORAGE_FAILURE, -2)  # expected ones
        check_exact(receiver, msgs)
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_a_mute_receiver_is_detected_by_keepalive(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        receiver = Receiver(server_ctx)
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx, keepalive=0.1)
        await sender.start()
        await sender.submit(data(1))
        await sender.wait_acked("d0", 1, timeout=5)
        receiver.mute()  # the link looks up but nothing comes back
        await sender.submit(data(2))
        await sender.wait_acked("d0", 2, timeout=5)  # on a new connection
        assert sender.reconnects == 1
        assert isinstance(sender.last_error, TimeoutError)
        check_exact(receiver, [data(1), data(2)])
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_on_ack_reports_every_advance_in_order(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        receiver = Receiver(server_ctx, ack_every=4, drop_at=(30,))
        await receiver.start()
        seen: list[tuple[str, int]] = []
        backoff = Backoff(initial=0.02, maximum=0.2, rng=random.Random(7))
        sender = StreamSender(
            "127.0.0.1", receiver.port, client_ctx, name="ps-test", backoff=backoff,
            on_ack=lambda disk, seq: seen.append((disk, seq)),
        )  # fmt: skip
        sender.add_disk("d0", "m0", 1 << 30)
        await sender.start()
        for msg in stream(60):
            await sender.submit(msg)
        await sender.wait_acked("d0", 60, timeout=10)
        seqs = [s for d, s in seen if d == "d0"]
        assert seqs and seqs[-1] == 60
        assert seqs == sorted(seqs), "acknowledgements must only move forward"
        assert len(set(seqs)) > 3
        await sender.close()
        await receiver.stop()

    run(scenario())


def test_window_continues_from_an_ack_past_what_was_put() -> None:
    async def scenario() -> None:
        window = OutboundWindow(1 << 20)
        for seq in (1, 2, 3):
            await window.put(data(seq))
        window.ack(7)  # e.g. a restarted process server learns the target has up to 7
        await window.put(data(5))  # already durable over there: dropped, no error
        await window.put(data(8))  # the stream goes on right after the ACK
        assert [m.seq for m in window.unacked()] == [8]
        with pytest.raises(ValueError, match="not contiguous"):
            await window.put(data(10))

    asyncio.run(scenario())


def seq_of(reply: DigestReply) -> int:
    """What the test receiver answers: the sequence it had applied at the request."""
    ((index, digest),) = reply.digests
    assert index == 0
    return int.from_bytes(digest, "big")


@pytest.mark.integration
def test_a_digest_request_rides_in_order_across_a_cut(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        # Frame 8 is lost with the connection: 8, 9, 10 are resent, then the request,
        # which must still come after 10 and before 11.
        receiver = Receiver(server_ctx, ack_every=3, drop_at=(8,))
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx)
        await sender.start()
        msgs = stream(20)
        for msg in msgs[:10]:
            await sender.submit(msg)
        reply = await sender.queue_request(digest_request(99))
        for msg in msgs[10:]:
            await sender.submit(msg)
        answer = await asyncio.wait_for(reply, 10)
        assert answer.request_id == 99  # the caller's id, whatever went on the wire
        assert seq_of(answer) == 10
        assert [seq for _, seq in receiver.disks["d0"].requests] == [10]
        await sender.wait_acked("d0", 20, timeout=10)
        assert sender.window("d0").requests() == []
        check_exact(receiver, msgs)
        assert sender.reconnects >= 1
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_an_unanswered_digest_request_is_resent_and_its_reply_resolves_it(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        receiver = Receiver(server_ctx, answer_digests=False, drop_at=(15,))
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx)
        await sender.start()
        msgs = stream(20)
        for msg in msgs[:10]:
            await sender.submit(msg)
        task = asyncio.create_task(sender.request(digest_request(5)))
        await eventually(lambda: "d0" in receiver.disks and bool(receiver.disks["d0"].requests))
        receiver.answer_digests = True  # the cut at frame 15 loses the request's reply
        for msg in msgs[10:]:
            await sender.submit(msg)
        answer = await asyncio.wait_for(task, 10)
        first, again = receiver.disks["d0"].requests
        assert first[1] == 10  # in order the first time
        # Resent right after the ACK of 14 (all the receiver had), before 15: it
        # describes at least everything sent before it.
        assert again[1] == 14 and seq_of(answer) == 14
        assert first[0] == again[0]  # the same request, so a late reply to either works
        await sender.wait_acked("d0", 20, timeout=10)
        assert sender.window("d0").requests() == []
        check_exact(receiver, msgs)
        await sender.close()
        await receiver.stop()

    run(scenario())


@pytest.mark.integration
def test_a_digest_request_fails_with_the_stream(
    run: Runner, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async def scenario() -> None:
        receiver = Receiver(server_ctx, answer_digests=False)
        await receiver.start()
        sender = make_sender(receiver.port, client_ctx)
        await sender.start()
        await sender.submit(data(1))
        reply = await sender.queue_request(digest_request(1))
        await eventually(lambda: "d0" in receiver.disks and bool(receiver.disks["d0"].requests))
        await sender.close()
        with pytest.raises(ConnectionClosed):
            await reply
        with pytest.raises(ConnectionClosed):
            await sender.queue_request(digest_request(2))
        await receiver.stop()

    run(scenario())
