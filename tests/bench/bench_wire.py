"""Throughput of 1 MiB DATA frames through `Connection` over TLS, against plain TLS.

Run: .venv/bin/python tests/bench/bench_wire.py [--frames N] [--runs R]

Both modes use uvloop, TLS 1.3 with the same certificates, and a receiver in a
separate process (started once, serving both modes on two ports):

- frames: `Connection.send(Data.raw(...))` per frame (header, CRC32, no payload copy)
  into a `start_server` handler that `recv()`s every frame (decode, CRC check) and
  answers a final PING with the payload bytes it saw.
- plain: an asyncio stream writing the same frame bytes (encoded once, no CRC work
  per frame) into a Protocol that only counts bytes.

The two modes alternate, `runs` times each; each run moves `frames` MiB of payload
and is timed from the first write to the receiver's answer. Medians are reported,
and the ratio frames/plain. The CPU time both processes spent per MiB is reported
too (Linux /proc): on a loaded machine the wall-clock ratio swings with what else
runs, while the CPU ratio says what our framing costs. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import uvloop

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from appliance.wire.connection import Connection, open_connection, start_server  # noqa: E402
from appliance.wire.errors import ErrorCounters  # noqa: E402
from appliance.wire.messages import Data, Ping, Pong, encode_message  # noqa: E402
from appliance.wire.tls import client_context, server_context  # noqa: E402

MIB = 1024 * 1024
COUNT = struct.Struct("!Q")


# -- receiver process ------------------------------------------------------------------


class _Counter(asyncio.Protocol):
    """Plain mode: the first 8 bytes say how many follow; answer b"K" when all arrived."""

    def __init__(self) -> None:
        self.expected: int | None = None
        self.head = b""
        self.seen = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.expected is None:
            self.head += data
            if len(self.head) < COUNT.size:
                return
            (self.expected,) = COUNT.unpack_from(self.head)
            data = self.head[COUNT.size :]
        self.seen += len(data)
        if self.seen >= self.expected and self.transport is not None:
            self.transport.write(b"K")


async def _frames_handler(conn: Connection) -> None:
    total = 0
    while True:
        msg = await conn.recv()
        if isinstance(msg, Data):
            total += len(msg.payload)
        elif isinstance(msg, Ping):
            await conn.send(Pong(total))


async def serve(certs: Path) -> None:
    ctx = server_context(certs / "server.crt", certs / "server.key", certs / "ca.crt")
    wire = await start_server(_frames_handler, "127.0.0.1", 0, ctx, counters=ErrorCounters())
    loop = asyncio.get_running_loop()
    plain = await loop.create_server(_Counter, "127.0.0.1", 0, ssl=ctx)
    plain_port = plain.sockets[0].getsockname()[1]
    print(json.dumps({"frames": wire.port, "plain": plain_port}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    wire.close()
    plain.close()


# -- sender (this process) ---------------------------------------------------------------


async def run_frames(port: int, ctx: ssl.SSLContext, frames: int, payload: bytes) -> float:
    conn = await open_connection("127.0.0.1", port, ctx, server_hostname="localhost")
    start = time.perf_counter()
    for seq in range(1, frames + 1):
        await conn.send(Data.raw("bench", seq, (seq - 1) * len(payload), payload))
    await conn.send(Ping(1))
    answer = await conn.recv()
    elapsed = time.perf_counter() - start
    assert isinstance(answer, Pong) and answer.nonce == frames * len(payload), answer
    conn.close()
    await conn.wait_closed()
    return elapsed


async def run_plain(port: int, ctx: ssl.SSLContext, frames: int, payload: bytes) -> float:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    frame = b"".join(bytes(p) for p in encode_message(Data.raw("bench", 1, 0, payload)))
    start = time.perf_counter()
    writer.write(COUNT.pack(frames * len(frame)))
    for _ in range(frames):
        writer.write(frame)
        await writer.drain()
    assert await reader.readexactly(1) == b"K"
    elapsed = time.perf_counter() - start
    writer.close()
    await writer.wait_closed()
    return elapsed


def make_certs(directory: Path) -> None:
    from tests.pki import Authority

    ca = Authority.create(directory / "pki", "Bench CA")
    server, client = ca.issue("target.bench"), ca.issue("process.bench")
    for name, path in (
        ("ca.crt", ca.cert),
        ("server.crt", server.cert),
        ("server.key", server.key),
        ("client.crt", client.cert),
        ("client.key", client.key),
    ):
        (directory / name).symlink_to(path)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of this process (pid 0) or of a child, from /proc."""
    if pid == 0:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    ports: dict[str, int], certs: Path, frames: int, runs: int, receiver: int
) -> dict[str, object]:
    ctx = client_context(certs / "client.crt", certs / "client.key", certs / "ca.crt")
    payload = os.urandom(MIB)
    mib = frames * len(payload) / MIB
    # Warm both paths (TLS session setup, page faults, the receiver's first allocations).
    await run_frames(ports["frames"], ctx, 8, payload)
    await run_plain(ports["plain"], ctx, 8, payload)
    results: dict[str, list[float]] = {"frames": [], "plain": []}
    cpu: dict[str, list[float]] = {"frames": [], "plain": []}
    for i in range(runs):
        order = ("frames", "plain") if i % 2 == 0 else ("plain", "frames")
        for mode in order:
            runner = run_frames if mode == "frames" else run_plain
            before = cpu_seconds(0) + cpu_seconds(receiver)
            elapsed = await runner(ports[mode], ctx, frames, payload)
            spent = cpu_seconds(0) + cpu_seconds(receiver) - before
            results[mode].append(mib / elapsed)
            cpu[mode].append(spent * 1000 / mib)
            print(
                f"run {i + 1}/{runs} {mode:6s} {mib / elapsed:8.1f} MiB/s ({elapsed:.2f}s), "
                f"cpu {spent * 1000 / mib:.2f} ms/MiB (both processes)"
            )
    frames_mib_s = statistics.median(results["frames"])
    plain_mib_s = statistics.median(results["plain"])
    frames_cpu = statistics.median(cpu["frames"])
    plain_cpu = statistics.median(cpu["plain"])
    return {
        "bench": "wire",
        "frames_mib_s": round(frames_mib_s, 1),
        "plain_tls_mib_s": round(plain_mib_s, 1),
        "ratio": round(frames_mib_s / plain_mib_s, 3),
        "frames_cpu_ms_per_mib": round(frames_cpu, 3),
        "plain_tls_cpu_ms_per_mib": round(plain_cpu, 3),
        "cpu_ratio": round(plain_cpu / frames_cpu, 3),
        "runs": runs,
        "mib_per_run": mib,
        "frame_payload_bytes": MIB,
        "loop": "uvloop",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=512, help="1 MiB frames per run")
    parser.add_argument("--runs", type=int, default=5, help="runs of each mode")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # receiver process
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        certs = Path(tmp)
        make_certs(certs)
        receiver = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(certs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert receiver.stdout is not None
            ports = json.loads(receiver.stdout.readline())
            print(
                f"wire bench: {args.runs} runs x {args.frames} MiB each mode, 1 MiB DATA frames, "
                f"TLS 1.3 on loopback, uvloop, receiver pid {receiver.pid}"
            )
            result = uvloop.run(measure(ports, certs, args.frames, args.runs, receiver.pid))
        finally:
            assert receiver.stdin is not None
            receiver.stdin.close()
            try:
                receiver.wait(10)
            except subprocess.TimeoutExpired:
                receiver.kill()
                receiver.wait()
    print(
        f"median: frames {result['frames_mib_s']} MiB/s, plain TLS {result['plain_tls_mib_s']} "
        f"MiB/s, ratio {result['ratio']} (target >= 0.70); cpu per MiB: frames "
        f"{result['frames_cpu_ms_per_mib']} ms, plain {result['plain_tls_cpu_ms_per_mib']} ms, "
        f"cpu ratio {result['cpu_ratio']}; load average {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cpus"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
