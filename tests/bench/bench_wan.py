"""The process server's WAN case: is a 50 ms, 100 Mbit/s link kept full while there is backlog?

Issue 3 asks for "master target behind tc netem with 50 ms delay and a 100 Mbit/s
limit - the link kept full (>= 90% used) when there is backlog". This script builds
that site on one machine, as root, and measures it.

The link. This kernel has no netem (CONFIG_NET_SCH_NETEM is not set; `tc qdisc add
... netem` answers "Specified qdisc kind is unknown"), and nothing else in it can hold
packets back for a fixed time. So the link is emulated in user space with netem's own
model, by a child process of this script (`--wire`): two TUN devices, one in the root
namespace and one moved into a fresh network namespace `ss-wan-<pid>`, addressed
10.a.b.1 <-> 10.a.b.2 (a /30 chosen from the pid that no existing route overlaps;
nothing leaves the machine). Each direction is a FIFO: a packet is serialised at the
rate (100 Mbit/s of IP bytes), then delivered `one-way delay` later; more than 1000
packets held in a direction are dropped (netem's default `limit`). So each direction
behaves like `netem delay 25ms rate 100mbit limit 1000`. The delay is 25 ms each way,
50 ms round trip: a WAN's latency is quoted as a round trip (what ping shows), and
25 ms on both ends is how netem would be set up for "50 ms delay" between two sites.
`BENCH_WAN_ONE_WAY_MS=50` reads it as one way instead (100 ms round trip).
TUN rather than veth because the wire must be in user space: TUN hands it single IP
packets (no offloads, no ARP), and its devices vanish when the wire process exits.
iproute2 (`ip`, via subprocess) sets it up, not pyroute2: the daemon must run under
`ip netns exec` anyway, every step is then a command one can repeat by hand, and
with no qdisc to configure what is left (a namespace, a device move, addresses) is
as plain in `ip` as in pyroute2. The wire runs at nice -10 (about 10% of a core):
a late wake-up would be a late packet.

Measured in the same run:
1. Baseline: the round-trip time (TCP connect, SYN to SYN-ACK) and a plain TCP bulk
   transfer from the root namespace into a sink inside the namespace: what 100% looks
   like through this wire.
2. secondsite-targetd inside the namespace (`ip netns exec`), secondsite-processd in the
   root namespace forwarding to it over the link (TLS; `target.tls_name = "localhost"`,
   the name the test certificates carry). An agent (StreamSender here) sends
   BENCH_WAN_MIB (default 512) MiB of semi-compressible 1 MiB extents as fast as it
   can; processd spools them at disk speed and drains them over the link. Every
   second: bytes delivered into the namespace (rx of its TUN device, i.e. what left
   the 100 Mbit/s bottleneck) and processd's status (backlog). Utilisation = delivered
   bytes/s over 100 Mbit/s, for each one-second interval with backlog at both ends,
   except the interval(s) after the last data byte was delivered (the link is then
   idle because the data ran out; only the target's checkpoint ACK is awaited).
   Reported: median, p10 and mean utilisation, the end to end figure in MB/s of
   decoded data (compression makes it higher than the link's 12.5 MB/s) and in MB/s
   on the wire, the TCP sender's state from `ss -ti` (for each second below 90%: did
   processd leave the socket empty, did TCP retransmit), and the wire's drops and CPU.
   `target_met`: mean utilisation over the seconds with backlog >= 0.9 (the share of
   the link used while there was backlog).

Reading it: with BBR (this machine's default congestion control) every TCP flow
through the link, the baseline's too, dips to ~70-85% for a second every 10 s: BBR's
PROBE_RTT cuts the congestion window to 4 packets for 200 ms. So p10 sits near 0.9
whatever processd does; the baseline's p10 in the same run shows how much of that is
TCP. A second below 90% with an empty socket (`notsent` 0) would be processd's fault.
Knobs: BENCH_WAN_MIB, BENCH_WAN_ONE_WAY_MS, BENCH_WAN_MBIT, BENCH_WAN_WINDOW_MIB
(targetd's stream.window_mib, default: the daemon's), BENCH_WAN_BASELINE_S,
BENCH_WAN_BASELINE_CC (the baseline socket's congestion control, e.g. cubic).

Needs root, iproute2 and /dev/net/tun, else it prints a "skipped" JSON line and exits
0. The namespace, the daemons and the wire are removed in a finally (Ctrl-C and
SIGTERM included). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from appliance.wire.connection import Connection
    from tests.conftest import TlsMaterial
    from tests.integration.daemons import RoleDaemon

# appliance and tests are imported where used: the wire and sink children need neither.

MIB = 1024 * 1024
TOTAL_MIB = int(os.environ.get("BENCH_WAN_MIB", "512"))
ONE_WAY_MS = float(os.environ.get("BENCH_WAN_ONE_WAY_MS", "25"))
LINK_MBIT = float(os.environ.get("BENCH_WAN_MBIT", "100"))
WINDOW_MIB = os.environ.get("BENCH_WAN_WINDOW_MIB", "")  # targetd stream.window_mib
LIMIT_PACKETS = 1000  # netem's default queue limit, per direction
# Long enough to hold BBR's PROBE_RTT (every 10 s), which the replication run meets too.
BASELINE_SECONDS = float(os.environ.get("BENCH_WAN_BASELINE_S", "24"))
BASELINE_CC = os.environ.get("BENCH_WAN_BASELINE_CC", "")  # "": the system's, as processd
SAMPLE_SECONDS = 1.0
TARGET_PORT = 9442
SINK_PORT = 5001
DISK = "wan0"
DISK_SIZE = 4096 * MIB
DRAIN_TIMEOUT = 150.0

# -- the wire (a child process: `bench_wan.py --wire HOST_IF NS_IF ONE_WAY_MS MBIT LIMIT`) --

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM when the bench process goes, however it goes (the TUN devices go too)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


@dataclass
class Lane:
    """One direction of the link, netem's model: serialise at the rate, then delay."""

    dst: int
    delay: float
    seconds_per_byte: float
    limit: int
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    busy_until: float = 0.0
    packets: int = 0
    sent_bytes: int = 0
    drops: int = 0
    write_errors: int = 0
    peak: int = 0

    def arrive(self, now: float, packet: bytes) -> None:
        if len(self.queue) >= self.limit:
            self.drops += 1
            return
        self.busy_until = max(now, self.busy_until) + len(packet) * self.seconds_per_byte
        self.queue.append((self.busy_until + self.delay, packet))
        self.peak = max(self.peak, len(self.queue))

    def deliver(self, now: float) -> float | None:
        """Write every packet that is due; seconds until the next one (None: empty)."""
        queue = self.queue
        while queue and queue[0][0] <= now:
            packet = queue.popleft()[1]
            try:
                os.write(self.dst, packet)
            except OSError:
                self.write_errors += 1
                continue
            self.packets += 1
            self.sent_bytes += len(packet)
        return queue[0][0] - now if queue else None

    def stats(self) -> dict[str, int]:
        return {
            "packets": self.packets,
            "bytes": self.sent_bytes,
            "drops": self.drops,
            "write_errors": self.write_errors,
            "peak_held": self.peak,
        }


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def wire_main(host_if: str, ns_if: str, one_way_ms: float, mbit: float, limit: int) -> None:
    die_with_parent()
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    with contextlib.suppress(OSError):
        os.nice(-10)  # a late wake-up is a late packet: keep other load from delaying it
    a, b = open_tun(host_if), open_tun(ns_if)
    spb = 8 / (mbit * 1e6)
    lanes = {
        a: Lane(b, one_way_ms / 1000, spb, limit),  # toward the target
        b: Lane(a, one_way_ms / 1000, spb, limit),  # back
    }
    poller = select.epoll()
    for fd in lanes:
        poller.register(fd, select.EPOLLIN)
    print("ready", flush=True)
    try:
        while True:
            now = time.monotonic()
            waits = [w for lane in lanes.values() if (w := lane.deliver(now)) is not None]
            events = poller.poll(min(waits) if waits else 1.0)
            now = time.monotonic()
            for fd, _ in events:
                lane = lanes[fd]
                for _ in range(1024):
                    try:
                        lane.arrive(now, os.read(fd, 65536))
                    except BlockingIOError:
                        break
    except _Stop:
        pass
    cpu = os.times()
    print(
        json.dumps(
            {
                "to_target": lanes[a].stats(),
                "to_process": lanes[b].stats(),
                "cpu_s": round(cpu.user + cpu.system, 2),
            }
        ),
        flush=True,
    )


# -- the sink (a child inside the namespace: `bench_wan.py --sink ADDR PORT`) ------------


def sink_main(addr: str, port: int) -> None:
    die_with_parent()
    signal.signal(signal.SIGTERM, _raise_stop)

    def drain(conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        with conn, contextlib.suppress(OSError):
            while conn.recv_into(buf):
                pass

    with socket.create_server((addr, port)) as server:
        print("ready", flush=True)
        with contextlib.suppress(_Stop):
            while True:
                conn, _ = server.accept()
                threading.Thread(target=drain, args=(conn,), daemon=True).start()


# -- the site -------------------------------------------------------------------------


class Skip(Exception):
    """The machine cannot build the site: reported as skipped, not failed."""


def sh(*cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"{proc.args!r}: no answer in {timeout}s")
    return proc.stdout.readline().strip()


def pick_subnet(pid: int) -> ipaddress.IPv4Network:
    """A /30 in 10.192.0.0/10 from the pid, overlapping no route or address already here."""
    used = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in json.loads(sh("ip", "-j", "-4", "route", "show", "table", "all") or "[]")
        if r.get("dst") not in (None, "default")
    ]
    for step in range(64):
        n = (pid + step * 997) % 16384
        net = ipaddress.IPv4Network(f"10.{192 + n // 256}.{n % 256}.0/30")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x /30 found")


@dataclass
class Site:
    """The namespace with the master target's end of the link, and the wire to it."""

    ns: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str
    one_way_ms: float
    mbit: float
    wire: subprocess.Popen[str] | None = None
    wire_stats: dict[str, Any] = field(default_factory=dict)
    created: bool = False

    @classmethod
    def for_pid(cls, pid: int, one_way_ms: float, mbit: float) -> Site:
        net = pick_subnet(pid)
        host, peer = (str(a) for a in list(net.hosts())[:2])
        return cls(f"ss-wan-{pid}", f"ssw{pid}h", f"ssw{pid}t", host, peer, one_way_ms, mbit)

    @property
    def bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8

    def up(self) -> None:
        sh("ip", "netns", "add", self.ns)
        self.created = True
        self.wire = subprocess.Popen(
            [sys.executable, __file__, "--wire", self.host_if, self.ns_if,
             str(self.one_way_ms), str(self.mbit), str(LIMIT_PACKETS)],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        if read_line(self.wire, 10) != "ready":
            raise RuntimeError("the wire did not start")
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", self.host_addr, "peer", self.ns_addr, "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "addr", "add", self.ns_addr, "peer", self.host_addr,
           "dev", self.ns_if)  # fmt: skip
        sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up")

    def down(self) -> None:
        if self.wire is not None and self.wire.poll() is None:
            self.wire.terminate()
            try:
                line = read_line(self.wire, 5)
                self.wire_stats = json.loads(line) if line.startswith("{") else {}
                self.wire.wait(5)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
                self.wire.kill()
                self.wire.wait()
        if self.created:
            sh("ip", "netns", "del", self.ns, check=False)  # its TUN end goes with it
        sh("ip", "link", "del", self.host_if, check=False)  # gone with the wire already

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def delivered(self) -> int:
        """Bytes the link has delivered into the namespace (its TUN device's rx)."""
        out = json.loads(sh("ip", "-n", self.ns, "-j", "-s", "link", "show", "dev", self.ns_if))
        return int(out[0]["stats64"]["rx"]["bytes"])

    def entered(self) -> int:
        """Bytes handed to the link in the root namespace (queue and drops included)."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/tx_bytes").read_text())


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "ss"):
        if shutil.which(tool) is None:
            return f"no {tool} (iproute2)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun"
    probe = f"ss-wan-probe-{os.getpid()}"
    cmd = ["ip", "netns", "add", probe]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"ip netns unavailable: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


# -- baseline --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 1])."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def baseline(
    site: Site, seconds: float = BASELINE_SECONDS, cc: str = BASELINE_CC
) -> dict[str, Any]:
    """RTT and a plain TCP bulk transfer through the link, in the same terms as the run."""
    sink = subprocess.Popen(
        [*site.exec_prefix(), sys.executable, __file__, "--sink", site.ns_addr, str(SINK_PORT)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        if read_line(sink, 10) != "ready":
            raise RuntimeError("the sink did not start")
        rtts = []
        for _ in range(5):
            started = time.perf_counter()
            with socket.create_connection((site.ns_addr, SINK_PORT), timeout=5):
                rtts.append((time.perf_counter() - started) * 1000)
        stop = threading.Event()
        conn = socket.socket()
        if cc:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        conn.settimeout(5)
        conn.connect((site.ns_addr, SINK_PORT))
        used_cc = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)

        def push() -> None:
            chunk = os.urandom(MIB)
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    conn.sendall(chunk)

        pusher = threading.Thread(target=push, daemon=True)
        t0, d0 = time.perf_counter(), site.delivered()
        pusher.start()
        samples = [(t0, d0)]
        while samples[-1][0] - t0 < seconds:
            time.sleep(SAMPLE_SECONDS - (time.perf_counter() - t0) % SAMPLE_SECONDS)
            samples.append((time.perf_counter(), site.delivered()))
        stop.set()
        conn.shutdown(socket.SHUT_RDWR)
        pusher.join(5)
        conn.close()
    finally:
        sink.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sink.wait(5)
        if sink.poll() is None:
            sink.kill()
    rates = [(d1 - d0) / (t1 - t0) for (t0, d0), (t1, d1) in itertools.pairwise(samples)]
    utils = [r / site.bytes_per_s for r in rates]
    print(f"baseline utilisation per second (%): {' '.join(f'{u * 100:.0f}' for u in utils)}")
    return {
        "rtt_ms": round(statistics.median(rtts), 1),
        "tcp_cc": used_cc.rstrip(b"\0").decode(),
        "tcp_seconds": round(seconds),
        "tcp_mb_s": round(statistics.median(rates) / 1e6, 2),
        "tcp_util_median": round(statistics.median(utils), 3),
        "tcp_util_p10": round(percentile(utils, 0.1), 3),
        "tcp_util_mean": round(statistics.fmean(utils), 3),
        "tcp_util_min": round(min(utils), 3),
    }


# -- replication over the link -----------------------------------------------------------


class Rpc:
    """One control connection (HELLO as admin), reused for every call."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._id = 0
        self._lock = asyncio.Lock()  # one call at a time: replies are read in order

    @classmethod
    async def open(cls, host: str, port: int, tls: TlsMaterial) -> Rpc:
        from appliance.wire.connection import open_connection
        from appliance.wire.messages import Hello
        from appliance.wire.tls import client_context

        ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
        conn = await open_connection(host, port, ctx, server_hostname="localhost")
        await conn.send(Hello("admin", "bench-wan"))
        await conn.recv()
        return cls(conn)

    async def call(self, method: str, **params: object) -> dict[str, Any]:
        from appliance.wire.messages import Request, Response

        async with self._lock:
            self._id += 1
            await self._conn.send(Request.make(self._id, method, **params))
            while not isinstance(reply := await self._conn.recv(), Response):
                pass
        result: dict[str, Any] = json.loads(reply.result)
        return result

    def close(self) -> None:
        self._conn.close()


@dataclass
class Sample:
    t: float
    delivered: int
    entered: int
    backlog: int  # processd: spooled bytes the target has not acknowledged
    acked_seq: int
    wire_out: int  # processd: bytes admitted into its window toward the target
    tcp: dict[str, Any]  # ss -ti of that connection (ss_fields)


def tcp_info(site: Site) -> str:
    """`ss -ti` of processd's connection to the target (one line of key:value fields)."""
    out = sh("ss", "-tinH", "state", "established", "dst", f"{site.ns_addr}:{TARGET_PORT}")
    return " ".join(out.split())


def ss_fields(info: str) -> dict[str, Any]:
    """The figures of `ss -ti` that say what limited the sender."""
    found: dict[str, Any] = {"app_limited": "app_limited" in info}
    for key in ("cwnd", "notsent", "unacked", "lost"):
        m = re.search(rf"\b{key}:(\d+)", info)
        found[key] = int(m.group(1)) if m else 0
    if m := re.search(r"\brtt:([\d.]+)", info):
        found["rtt_ms"] = float(m.group(1))
    for key in ("delivery_rate", "pacing_rate"):
        if m := re.search(rf"\b{key} (\d+)bps", info):
            found[f"{key}_mbit"] = round(int(m.group(1)) / 1e6, 1)
    for key in ("busy", "rwnd_limited", "sndbuf_limited"):
        if m := re.search(rf"\b{key}:(\d+)ms", info):
            found[f"{key}_ms"] = int(m.group(1))
    if m := re.search(r"\b(bbr|cubic|reno)\b", info):
        found["cc"] = m.group(1)
    m = re.search(r"\bretrans:\d+/(\d+)", info)
    found["retrans"] = int(m.group(1)) if m else 0
    return found


async def replicate(
    site: Site, process: RoleDaemon, target: RoleDaemon, tls: TlsMaterial
) -> dict[str, Any]:
    from appliance.wire.messages import Data
    from appliance.wire.sender import StreamSender
    from appliance.wire.tls import client_context
    from tests.bench.bench_compress import make_extents

    extents = make_extents(TOTAL_MIB)
    count = len(extents)
    ctx = client_context(tls.client.cert, tls.client.key, tls.ca.cert)
    sender = StreamSender("127.0.0.1", process.port, ctx, name="wan-agent", role="agent")
    sender.add_disk(DISK, "bench", DISK_SIZE)
    await sender.start()
    status = await Rpc.open("127.0.0.1", process.port, tls)
    samples: list[Sample] = []

    async def sample() -> Sample:
        t = time.perf_counter()
        delivered, entered = site.delivered(), site.entered()
        tcp = ss_fields(tcp_info(site))
        st = await status.call("status")
        disk: dict[str, Any] = next((d for d in st["disks"] if d["disk_id"] == DISK), {})
        return Sample(
            t, delivered, entered, disk.get("backlog_bytes", 0), disk.get("target_acked_seq", 0),
            disk.get("bytes_wire_out", 0), tcp,
        )  # fmt: skip

    async def sampler() -> None:
        start = time.perf_counter()
        while True:
            samples.append(await sample())
            await asyncio.sleep(SAMPLE_SECONDS - (time.perf_counter() - start) % SAMPLE_SECONDS)

    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.sleep(0.05)  # the first sample: counters before any data
        t0 = time.perf_counter()
        for i, extent in enumerate(extents):
            await sender.submit(Data.raw(DISK, i + 1, (i * MIB) % DISK_SIZE, extent))
        await sender.wait_acked(DISK, count, timeout=120)
        spooled_s = time.perf_counter() - t0
        print(f"agent: {TOTAL_MIB} MiB spooled by processd in {spooled_s:.1f}s", flush=True)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            st = await status.call("status")
            disk = next(d for d in st["disks"] if d["disk_id"] == DISK)
            if disk["target_acked_seq"] >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"not drained in {DRAIN_TIMEOUT}s: {disk}")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    samples.append(await sample())
    final_info = tcp_info(site)
    status.close()
    await sender.close()
    remote = await Rpc.open(site.ns_addr, target.port, tls)  # over the link, after the run
    tstatus = await remote.call("status")
    remote.close()
    tdisk = next(d for d in tstatus["disks"] if d["disk_id"] == DISK)
    return analyse(site, samples, count=count, elapsed=elapsed, spooled_s=spooled_s, st=st,
                   tdisk=tdisk, info=final_info)  # fmt: skip


def analyse(site: Site, samples: list[Sample], *, count: int, elapsed: float, spooled_s: float,
            st: dict[str, Any], tdisk: dict[str, Any], info: str) -> dict[str, Any]:  # fmt: skip
    done = samples[-1].delivered - 64 * 1024  # the last data byte is in by then
    kept: list[float] = []
    tail = 0
    all_backlog: list[float] = []
    dips: list[dict[str, Any]] = []
    app_limited = empty = 0
    for a, b in itertools.pairwise(samples):
        if not (a.backlog > 0 and b.backlog > 0):
            continue
        util = (b.delivered - a.delivered) / (b.t - a.t) / site.bytes_per_s
        all_backlog.append(util)
        if b.delivered >= done:
            tail += 1  # the data ran out inside this interval: only the final ACK is awaited
            continue
        kept.append(util)
        app_limited += b.tcp["app_limited"]
        empty += b.tcp["notsent"] == 0  # processd had nothing waiting in the socket
        if util < 0.9:  # what the sender saw in that second
            dips.append({
                "at_s": round(b.t - samples[0].t, 1),
                "util": round(util, 3),
                "retrans": b.tcp["retrans"] - a.tcp["retrans"],
                "app_limited": b.tcp["app_limited"],
                "notsent": b.tcp["notsent"],
                "rtt_ms": b.tcp.get("rtt_ms"),
                "window_in_mb": round((b.wire_out - a.wire_out) / 1e6, 1),
                "acked_mib": b.acked_seq - a.acked_seq,
            })  # fmt: skip
    sdisk = next(d for d in st["disks"] if d["disk_id"] == DISK)
    decoded_mb = count * MIB / 1e6
    wire_bytes = samples[-1].delivered - samples[0].delivered
    series = " ".join(f"{u * 100:.0f}" for u in kept)
    print(f"utilisation per second with backlog (%): {series}", flush=True)
    for dip in dips:
        print(f"  below 90% at {dip['at_s']}s: {dip}", flush=True)
    return {
        "util_median": round(statistics.median(kept), 3) if kept else None,
        "util_p10": round(percentile(kept, 0.1), 3) if kept else None,
        "util_mean": round(statistics.fmean(kept), 3) if kept else None,
        "util_min": round(min(kept), 3) if kept else None,
        "backlog_intervals": len(kept),
        "tail_intervals_excluded": tail,
        "util_median_incl_tail": round(statistics.median(all_backlog), 3) if all_backlog else None,
        "app_limited_samples": app_limited,
        "socket_empty_samples": empty,
        "dips": dips,
        "effective_mb_s": round(decoded_mb / elapsed, 2),
        "wire_mb_s": round(wire_bytes / elapsed / 1e6, 2),
        "elapsed_s": round(elapsed, 1),
        "spooled_s": round(spooled_s, 1),
        "compression_ratio": st["target"]["compression_ratio"],
        "processd_bytes_wire_out": sdisk["bytes_wire_out"],
        "processd_bytes_raw_out": sdisk["bytes_raw_out"],
        "target_bytes_in": tdisk["bytes_in"],
        "target_bytes_applied": tdisk["bytes_applied"],
        "tcp_sender": ss_fields(info),
    }


def run(site: Site, base: Path) -> dict[str, Any]:
    import uvloop

    from tests.conftest import TlsMaterial
    from tests.integration.daemons import RoleDaemon
    from tests.pki import Authority

    ca = Authority.create(base / "pki")
    tls = TlsMaterial(ca, ca.issue("site.bench"), ca.issue("agent.bench"), ca, ca.issue("x"),
                      ca.issue("y"))  # fmt: skip
    stream = f"[stream]\nwindow_mib = {int(WINDOW_MIB)}\n" if WINDOW_MIB else ""
    target = RoleDaemon(base / "target", TARGET_PORT, tls, stream, "appliance.target",
                        host=site.ns_addr, prefix=site.exec_prefix())  # fmt: skip
    forward = f'[target]\naddress = "{site.ns_addr}:{TARGET_PORT}"\ntls_name = "localhost"\n'
    process = RoleDaemon(base / "process", free_port(), tls, forward, "appliance.process")
    try:
        for d in (target, process):
            d.state_dir.mkdir()
            d.start()
        return uvloop.run(replicate(site, process, target, tls))
    finally:
        for d in (process, target):
            if d.process and d.process.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    d.stop(timeout=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    reason = skip_reason()
    if reason is not None:
        print(f"wan: skipped ({reason})")
        print(json.dumps({"bench": "wan", "skipped": reason}))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally below runs
    site = Site.for_pid(os.getpid(), ONE_WAY_MS, LINK_MBIT)
    base = Path(tempfile.mkdtemp(prefix="bench-wan-", dir="/var/tmp"))
    try:
        site.up()
        print(f"site: {site.ns} {site.host_addr} <-> {site.ns_addr}, {site.one_way_ms:g} ms "
              f"each way, {site.mbit:g} Mbit/s, {LIMIT_PACKETS} packets per direction "
              f"(user-space wire, netem's model)", flush=True)  # fmt: skip
        base_line = baseline(site)
        print(f"baseline: rtt {base_line['rtt_ms']} ms; plain TCP ({base_line['tcp_cc']}) "
              f"{base_line['tcp_mb_s']} MB/s: utilisation median {base_line['tcp_util_median']:.1%}"
              f", p10 {base_line['tcp_util_p10']:.1%}, mean {base_line['tcp_util_mean']:.1%} over "
              f"{base_line['tcp_seconds']} s", flush=True)  # fmt: skip
        result = run(site, base)
    finally:
        site.down()
        shutil.rmtree(base, ignore_errors=True)
    wire = site.wire_stats
    to_target = wire.get("to_target", {})
    cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    mean = result["util_mean"]
    out = {
        "bench": "wan",
        "util_median": result["util_median"],
        "util_p10": result["util_p10"],
        "util_mean": mean,
        "target_util": 0.9,
        "target_met": mean is not None and mean >= 0.9,
        "util_mean_vs_baseline": round(mean / base_line["tcp_util_mean"], 3) if mean else None,
        "effective_mb_s": result["effective_mb_s"],
        "wire_mb_s": result["wire_mb_s"],
        "link_mb_s": round(site.bytes_per_s / 1e6, 2),
        "baseline": base_line,
        **{k: v for k, v in result.items() if k not in ("util_median", "util_p10", "util_mean")},
        "wire_drops_to_target": to_target.get("drops"),
        "wire_peak_held_to_target": to_target.get("peak_held"),
        "wire_cpu_s": wire.get("cpu_s"),
        "one_way_ms": site.one_way_ms,
        "link_mbit": site.mbit,
        "mib": TOTAL_MIB,
        "congestion_control": cc,
        "target_window_mib": int(WINDOW_MIB) if WINDOW_MIB else "default",
    }
    med, p10, tcp = out["util_median"], out["util_p10"], result["tcp_sender"]
    print(
        f"processd -> targetd over the link: utilisation median {med:.1%}, p10 {p10:.1%}, "
        f"mean {mean:.1%} over {result['backlog_intervals']} s with backlog (target: >= 90% "
        f"used; met: {out['target_met']}); socket left empty by processd in "
        f"{result['socket_empty_samples']} of them",
        flush=True,
    )
    print(
        f"throughput: {out['effective_mb_s']} MB/s of decoded data end to end, "
        f"{out['wire_mb_s']} MB/s on the wire (link {out['link_mb_s']} MB/s), compression "
        f"ratio {result['compression_ratio']}; TCP {tcp.get('cc')}: rtt {tcp.get('rtt_ms')} ms, "
        f"{tcp.get('retrans')} retransmits, rwnd-limited {tcp.get('rwnd_limited_ms', 0)} ms, "
        f"sndbuf-limited {tcp.get('sndbuf_limited_ms', 0)} ms; wire drops "
        f"{out['wire_drops_to_target']}, wire CPU {out['wire_cpu_s']} s",
        flush=True,
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wire", nargs=5, metavar=("HOST_IF", "NS_IF", "MS", "MBIT", "LIMIT"))
    parser.add_argument("--sink", nargs=2, metavar=("ADDR", "PORT"))
    args = parser.parse_args()
    if args.wire:
        host_if, ns_if, ms, mbit, limit = args.wire
        wire_main(host_if, ns_if, float(ms), float(mbit), int(limit))
    elif args.sink:
        sink_main(args.sink[0], int(args.sink[1]))
    else:
        sys.exit(main())
