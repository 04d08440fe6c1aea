"""secondsite-targetd as an operator and a peer meet it: CLI, readiness, bad input, stop."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop
import zstandard

from appliance.wire.connection import open_connection
from appliance.wire.errors import ErrorCode, PeerError
from appliance.wire.messages import (
    Ack,
    Data,
    DiskOpened,
    Encoding,
    Extent,
    Extents,
    Hello,
    Message,
    OpenDisk,
    Ping,
    Pong,
    Request,
    Response,
    Tag,
    TagKind,
    Welcome,
)
from appliance.wire.tls import client_context
from tests.conftest import TlsMaterial
from tests.integration.daemons import RoleDaemon, TargetDaemon

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


def targetd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.target", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_prints_resolved_defaults(tmp_path: Path) -> None:
    out = targetd("--state-dir", str(tmp_path), "--check-config")
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["port"] == 9442
    assert config["datastore"] == str(tmp_path / "datastore")
    assert config["window_bytes"] == 32 * MIB


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[server]\nlisten = 9442\n", "server.listen = 9442 is not a str"),
        ("[server]\nlisten = 'nohost'\n", "must be HOST:PORT"),
        ("[stream]\nwindow_mb = 4\n", "unknown setting 'stream.window_mb'"),
        ("[journal]\nlevel = 40\n", "must be between 1 and 19"),
        ("[server\n", "cannot read"),
    ],
)
def test_bad_config_is_one_line_exit_3(tmp_path: Path, content: str, needle: str) -> None:
    config = tmp_path / "target.toml"
    config.write_text(content)
    out = targetd("--config", str(config), "--check-config")
    assert out.returncode == 3
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_missing_config_file_and_tls_are_operator_errors(tmp_path: Path) -> None:
    out = targetd("--config", str(tmp_path / "absent.toml"))
    assert out.returncode == 3 and "does not exist" in out.stderr
    out = targetd("--state-dir", str(tmp_path), "--listen", "127.0.0.1:1")
    assert out.returncode == 3
    assert "TLS certificate" in out.stderr and "hint: enrol" in out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_is_exit_4(tmp_path: Path, tls: TlsMaterial, port: int) -> None:
    daemon = TargetDaemon(tmp_path / "t", port, tls)
    daemon.state_dir.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        out = targetd("--config", str(daemon.config))
    assert out.returncode == 4, out.stderr
    assert "cannot listen" in out.stderr and "Traceback" not in out.stderr


async def _session(daemon: RoleDaemon, tls: TlsMaterial, *msgs: Message) -> list[Message]:
    """Send `msgs` after HELLO; collect replies until the server closes or goes quiet."""
    import asyncio

    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    conn = await open_connection("127.0.0.1", daemon.port, ctx, server_hostname="localhost")
    replies: list[Message] = []
    try:
        await conn.send(Hello("test", "daemon-test"))
        for msg in msgs:
            await conn.send(msg)
        while True:
            try:
                replies.append(await asyncio.wait_for(conn.recv(), 3))
            except (TimeoutError, PeerError) as exc:
                if isinstance(exc, PeerError):
                    replies.append(exc)  # type: ignore[arg-type]
                break
            except Exception:  # noqa: BLE001 - closed: the replies so far are the answer
                break
    finally:
        conn.close()
    return replies


def _status(daemon: RoleDaemon, tls: TlsMaterial) -> dict:  # type: ignore[type-arg]
    replies = uvloop.run(_session(daemon, tls, Request.make(1, "status")))
    answer = next(r for r in replies if isinstance(r, Response))
    assert answer.ok
    return json.loads(answer.result)  # type: ignore[no-any-return]


@pytest.fixture
def daemon(tmp_path: Path, tls: TlsMaterial, port: int):  # type: ignore[no-untyped-def]
    d = TargetDaemon(
        tmp_path / "target",
        port,
        tls,
        extra_config="[stream]\nwindow_mib = 1\ncheckpoint_seconds = 30\n",
    )
    d.state_dir.mkdir()
    d.start()
    yield d
    if d.process and d.process.poll() is None:
        d.kill()


def test_bad_stream_input_gets_named_errors_and_is_counted(
    daemon: RoleDaemon, tls: TlsMaterial
) -> None:
    page = b"x" * 4096
    cases: list[tuple[list[Message], ErrorCode]] = [
        ([Data("nodisk", 1, 0, 4096, Encoding.RAW, page)], ErrorCode.UNKNOWN_DISK),
        ([OpenDisk("../escape", "m", MIB)], ErrorCode.INVALID_REQUEST),
        (
            [OpenDisk("beyond", "m", MIB), Data("beyond", 1, MIB, 4096, Encoding.RAW, page)],
            ErrorCode.INVALID_REQUEST,
        ),
        (
            [OpenDisk("skew", "m", MIB), Data("skew", 1, 100, 4096, Encoding.RAW, page)],
            ErrorCode.INVALID_REQUEST,
        ),
        (
            [OpenDisk("gap", "m", MIB), Data("gap", 5, 0, 4096, Encoding.RAW, page)],
            ErrorCode.OUT_OF_WINDOW,
        ),
        # 4 KiB stays unacknowledged (below half the window, checkpoint timer 30 s),
        # so a 1 MiB frame on top of it overruns the 1 MiB window: deterministic.
        (
            [
                OpenDisk("window", "m", MIB),
                Data("window", 1, 0, 4096, Encoding.RAW, page),
                Data("window", 2, 0, MIB, Encoding.RAW, bytes(MIB)),
            ],
            ErrorCode.WINDOW_EXCEEDED,
        ),
        (
            [OpenDisk("zstd", "m", MIB), Data("zstd", 1, 0, 4096, Encoding.ZSTD, b"not zstd")],
            ErrorCode.MALFORMED_BODY,
        ),
        (
            [
                OpenDisk("xbeyond", "m", MIB),
                Extents.of(
                    "xbeyond",
                    1,
                    [Extent(0, 512, Encoding.ZERO), Extent(MIB, 512, Encoding.ZERO)],
                    b"",
                ),
            ],
            ErrorCode.INVALID_REQUEST,
        ),
        (
            [
                OpenDisk("xzstd", "m", MIB),
                Extents("xzstd", 1, (Extent(0, 4096, Encoding.RAW),), Encoding.ZSTD, b"no"),
            ],
            ErrorCode.MALFORMED_BODY,
        ),
        ([OpenDisk("beyond", "m", 2 * MIB)], ErrorCode.INVALID_REQUEST),
        ([Welcome("x", 1, 1)], ErrorCode.PROTOCOL_VIOLATION),
    ]
    for msgs, code in cases:
        replies = uvloop.run(_session(daemon, tls, *msgs))
        errors = [r for r in replies if isinstance(r, PeerError)]
        assert errors and errors[0].code == code, (msgs[-1], replies)
    counts = _status(daemon, tls)["errors"]
    assert counts["unknown_disk"] == 1
    assert counts["invalid_request"] == 5
    assert counts["out_of_window"] == 1
    assert counts["window_exceeded"] == 1
    assert counts["malformed_body"] == 2
    assert counts["protocol_violation"] == 1


def test_ping_requests_and_unknown_methods(daemon: RoleDaemon, tls: TlsMaterial) -> None:
    replies = uvloop.run(
        _session(
            daemon,
            tls,
            Ping(42),
            Request.make(7, "no-such-method"),
            Request.make(8, "materialize", machine_id="m", tag_id="nope", name="x"),
        )
    )
    assert Pong(42) in replies
    answers = {r.request_id: r for r in replies if isinstance(r, Response)}
    assert not answers[7].ok and "unknown method" in answers[7].result.decode()
    assert not answers[8].ok
    # Params that are not a JSON object, or not JSON at all: an answer, not a dropped peer.
    replies = uvloop.run(
        _session(daemon, tls, Request(9, "status", b"[1]"), Request(10, "status", b"{nope"))
    )
    answers = {r.request_id: r for r in replies if isinstance(r, Response)}
    assert not answers[9].ok and "params must be a JSON object" in answers[9].result.decode()
    assert not answers[10].ok and "JSONDecodeError" in answers[10].result.decode()


def test_sigterm_makes_pending_data_durable(daemon: RoleDaemon, tls: TlsMaterial) -> None:
    # No tag follows these writes: only the graceful stop can make them durable.
    writes = [
        Data("d1", s, (s - 1) * 4096, 4096, Encoding.RAW, bytes([s]) * 4096) for s in range(1, 6)
    ]
    replies = uvloop.run(_session(daemon, tls, OpenDisk("d1", "m", MIB), *writes))
    assert isinstance(replies[1], DiskOpened)
    assert daemon.stop() == 0
    flat = daemon.datastore / "d1" / "d1-flat.vmdk"
    assert flat.read_bytes()[: 5 * 4096] == b"".join(bytes([s]) * 4096 for s in range(1, 6))
    daemon.start()
    replies = uvloop.run(_session(daemon, tls, OpenDisk("d1", "m", MIB)))
    opened = next(r for r in replies if isinstance(r, DiskOpened))
    assert opened.durable_seq == 5


def test_points_listed_over_rpc(daemon: RoleDaemon, tls: TlsMaterial) -> None:
    async def run() -> list[dict]:  # type: ignore[type-arg]
        ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
        conn = await open_connection("127.0.0.1", daemon.port, ctx, server_hostname="localhost")
        try:
            await conn.send(Hello("test", "points"))
            for msg in (
                OpenDisk("d1", "m1", MIB),
                Data("d1", 1, 0, 4096, Encoding.RAW, b"a" * 4096),
                Tag("d1", 2, "p1", TagKind.APP, 1_000),
            ):
                await conn.send(msg)
            # The point exists once the tag is durable, i.e. acknowledged.
            while (reply := await conn.recv()) != Ack("d1", 2):
                pass
            await conn.send(Request.make(3, "points", machine_id="m1"))
            while not isinstance(reply := await conn.recv(), Response):
                pass
            return json.loads(reply.result)  # type: ignore[no-any-return]
        finally:
            conn.close()

    points = uvloop.run(run())
    assert [(p["tag_id"], p["kind"], p["usable"]) for p in points] == [("p1", "app", True)]


def test_a_steady_trickle_is_acknowledged_every_checkpoint_interval(
    tmp_path: Path, tls: TlsMaterial, port: int
) -> None:
    # Frames arrive every 50 ms, far below half the window: only the timer can ACK them.
    d = TargetDaemon(
        tmp_path / "target", port, tls, extra_config="[stream]\ncheckpoint_seconds = 0.3\n"
    )
    d.state_dir.mkdir()
    d.start()

    async def run() -> list[int]:
        ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
        conn = await open_connection("127.0.0.1", d.port, ctx, server_hostname="localhost")
        acks: list[int] = []

        async def read() -> None:
            while True:
                msg = await conn.recv()
                if isinstance(msg, Ack):
                    acks.append(msg.seq)

        try:
            await conn.send(Hello("test", "trickle"))
            await conn.send(OpenDisk("t1", "m", MIB))
            reader = asyncio.create_task(read())
            for seq in range(1, 41):
                await conn.send(Data("t1", seq, (seq % 64) * 4096, 4096, Encoding.RAW, page(seq)))
                await asyncio.sleep(0.05)
            seen = list(acks)  # while the trickle was still going on
            reader.cancel()
            return seen
        finally:
            conn.close()

    try:
        acks = uvloop.run(run())
    finally:
        d.stop()
    assert len(acks) >= 3, f"ACKs during a 2 s trickle: {acks}"
    assert acks == sorted(acks)


def page(seq: int) -> bytes:
    return bytes([seq]) * 4096


def test_changes_that_write_nothing_are_acknowledged_too(
    tmp_path: Path, tls: TlsMaterial, port: int
) -> None:
    """SAME frames (and, on a fenced replica, every change) advance the sequence without
    pending bytes; the checkpoint timer must still make them durable and ACK them, or a
    stream ending in them (a spool drained during a failover) is never acknowledged."""
    d = TargetDaemon(
        tmp_path / "target", port, tls, extra_config="[stream]\ncheckpoint_seconds = 0.3\n"
    )
    d.state_dir.mkdir()
    d.start()

    async def run() -> int:
        ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
        conn = await open_connection("127.0.0.1", d.port, ctx, server_hostname="localhost")
        acked = 0
        try:
            await conn.send(Hello("test", "same"))
            await conn.send(OpenDisk("s1", "m", MIB))

            async def acked_up_to(seq: int) -> None:
                nonlocal acked
                async with asyncio.timeout(10):
                    while acked < seq:
                        msg = await conn.recv()
                        if isinstance(msg, Ack):
                            acked = msg.seq

            await conn.send(Data("s1", 1, 0, 4096, Encoding.RAW, page(1)))
            await acked_up_to(1)  # the data is durable; only the SAME frames follow
            await conn.send(Data("s1", 2, 0, 4096, Encoding.SAME, b""))
            await conn.send(Data("s1", 3, 0, 4096, Encoding.SAME, b""))
            await acked_up_to(3)
        except TimeoutError:
            pass
        finally:
            conn.close()
        return acked

    try:
        acked = uvloop.run(run())
    finally:
        d.stop()
    assert acked == 3, f"acknowledged up to {acked}"


def test_extents_apply_as_one_change(daemon: RoleDaemon, tls: TlsMaterial) -> None:
    """RAW, ZERO and SAME extents under one seq, a zstd payload: the replica and the point
    after them hold exactly those changes."""
    raw = b"r" * 4096 + b"s" * 512
    extents = (
        Extent(0, 4096, Encoding.RAW),
        Extent(8192, 8192, Encoding.ZERO),
        Extent(32768, 4096, Encoding.SAME),
        Extent(65536, 512, Encoding.RAW),
    )
    msgs: list[Message] = [
        OpenDisk("x1", "m1", MIB),
        Data("x1", 1, 0, 128 * 1024, Encoding.RAW, b"v" * (128 * 1024)),
        Extents("x1", 2, extents, Encoding.ZSTD, zstandard.compress(raw)),
        Extents.of("x1", 3, [Extent(4096, 512, Encoding.RAW)], b"t" * 512),
        Tag("x1", 4, "after", TagKind.APP, 1_000),
    ]

    async def run() -> None:
        ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
        conn = await open_connection("127.0.0.1", daemon.port, ctx, server_hostname="localhost")
        try:
            await conn.send(Hello("test", "extents"))
            for msg in msgs:
                await conn.send(msg)
            async with asyncio.timeout(20):
                while (reply := await conn.recv()) != Ack("x1", 4):
                    assert not isinstance(reply, PeerError), reply
        finally:
            conn.close()

    uvloop.run(run())
    expected = bytearray(b"v" * (128 * 1024) + bytes(MIB - 128 * 1024))
    expected[0:4096] = b"r" * 4096
    expected[4096:4608] = b"t" * 512
    expected[8192:16384] = bytes(8192)
    expected[65536:66048] = b"s" * 512
    flat = daemon.datastore / "x1" / "x1-flat.vmdk"
    assert flat.read_bytes() == bytes(expected)
    disk = next(d for d in _status(daemon, tls)["disks"] if d["disk_id"] == "x1")
    assert disk["durable_seq"] == 4 and disk["frames_in"] == 4
    assert disk["bytes_applied"] == 128 * 1024 + 4096 + 8192 + 4096 + 512 + 512
