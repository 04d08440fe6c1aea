"""The agent end to end: secondsite-agent -> secondsite-processd -> secondsite-targetd.

Run (root): .venv/bin/python tests/bench/bench_agent.py [--mib 2048] [--delta-runs 3]
            [--rpo-seconds 60 | --no-rpo]

A `--mib` ext4 on a loop device, filled before any agent starts: a quarter random
(incompressible, including a preallocated file the write loads go to), 3/16 log-like
text, 1/16 written zeros, the rest never written (about half the disk non-zero). The
daemons and the agent run as separate processes, wired as the lab wires them.

(a) initial replication: agent start to the first recovery point listed by targetd,
    as MB/s of the whole disk, against `zstd -1 -T1` reading the same device into
    /dev/null (median of two, same run), as a ratio; once per tracker run below.
(b) delta: after 1% of the disk in random 4 KiB O_DIRECT writes, payload bytes the
    agent sent and the time from the last write's fsync to the first point newer than
    it listed by targetd, with the tracefs tracker and with the scan tracker. The
    agent runs with tag_interval 600 s and is sent SIGUSR1 (take a point now) right
    after the fsync, so the time is the delta's, not a wait for the schedule; targetd
    is polled every 20 ms. Against `rsync --no-whole-file --inplace` of the image file
    onto a copy of its state before the writes (skipped, and said so, without rsync).
    Each is run `--delta-runs` times (new random writes each time); medians reported,
    and the ratios rsync / tracker of the medians.
(c) RPO p50/p99 (now - newest point's time, sampled every 0.5 s from targetd's points
    RPC) under random 4 KiB O_DIRECT writes at 20 and 54 MB/s, default tag_interval 5 s.
(d) agent CPU seconds (as a share of one core over each window) and RSS (VmHWM, and
    the largest VmRSS sampled) during (a) and (c), from /proc/PID.
(e) agent CPU share over IDLE_SECONDS with nothing written and no tag due (after
    the deltas, per tracker): what the live drains cost an idle machine.
One JSON line per measurement; the last line printed is one JSON object with them all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from appliance.lab import disks  # noqa: E402
from appliance.lab.agent import read_agent_status  # noqa: E402
from appliance.lab.procs import free_port, spawn, stop  # noqa: E402
from appliance.lab.rpc import call  # noqa: E402
from appliance.lab.state import Proc  # noqa: E402
from tests.pki import Authority, Leaf  # noqa: E402

TLS_NAME = "localhost"  # every tests.pki leaf carries it


@dataclass(frozen=True)
class LabPki:
    ca: Path
    leaves: dict[str, Leaf]


def write_agent_config(
    path: Path, *, machine_id: str, state_dir: Path, process_port: int, tls_name: str,
    disks: list[str], cert: Path, key: Path, ca: Path,
) -> None:  # fmt: skip
    """A statically wired agent (no configuration server in this bench)."""
    disk_list = ", ".join(json.dumps(d) for d in disks)
    path.write_text(
        f'[agent]\nmachine_id = "{machine_id}"\nstate_dir = "{state_dir}"\n'
        f'process_server = "127.0.0.1:{process_port}"\ntls_name = "{tls_name}"\n'
        f'disks = [{disk_list}]\ntracker = "auto"\ntag_interval = 5.0\nfreeze_timeout = 1.0\n'
        f'\n[tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{ca}"\n'
    )


def make_pki(directory: Path, names: list[str]) -> LabPki:
    authority = Authority.create(directory)
    return LabPki(authority.cert, {name: authority.issue(name) for name in names})


MIB = 1 << 20
DELTA_TAG_INTERVAL = 600.0  # points only when asked (SIGUSR1), after the initial one
IDLE_SECONDS = 10.0  # (e) agent CPU with nothing to replicate, after the deltas
TICK = os.sysconf("SC_CLK_TCK")
WRITER = """
import mmap, os, random, sys, time
path, size, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096); buf.write(os.urandom(4096))
blocks, per_s = size // 4096, rate * 1e6 / 4096
start, n = time.monotonic(), 0
while time.monotonic() - start < seconds:
    os.pwrite(fd, buf, random.randrange(blocks) * 4096)
    n += 1
    ahead = n / per_s - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
print(n * 4096 / (time.monotonic() - start) / 1e6)
"""


def emit(record: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(record), flush=True)
    return record


# -- the chain -----------------------------------------------------------------


def start_daemon(name: str, argv: list[str], log: Path, notify: Path) -> Proc:
    """spawn + wait for READY=1. Not the lab's start_notified: its liveness check reads
    /proc/PID/cmdline, which can still be empty just after Popen returns."""
    notify.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.5)
    try:
        proc = spawn(name, argv, log, {"NOTIFY_SOCKET": str(notify)})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.waitpid(proc.pid, os.WNOHANG)[0]:
                raise RuntimeError(f"{name} exited at start:\n{log.read_text()[-2000:]}")
            try:
                if "READY=1" in sock.recv(4096).decode().splitlines():
                    return proc
            except TimeoutError:
                continue
        raise RuntimeError(f"{name} was not ready in 60 s")
    finally:
        sock.close()
        notify.unlink(missing_ok=True)


def daemon_config(work: Path, name: str, port: int, pki: LabPki, extra: str = "") -> Path:
    leaf = pki.leaves[name]
    path = work / f"{name}.toml"
    path.write_text(
        f'[server]\nname = "bench-{name}"\nlisten = "127.0.0.1:{port}"\n'
        f'state_dir = "{work / name}"\n\n[tls]\ncert = "{leaf.cert}"\nkey = "{leaf.key}"\n'
        f'ca = "{pki.ca}"\n{extra}'
    )
    return path


@dataclass
class Chain:
    work: Path
    pki: LabPki
    target_port: int
    process_port: int
    procs: list[Proc]
    device: str
    mount: Path

    def rpc(self, method: str, **params: Any) -> Any:
        admin = self.pki.leaves["admin"]
        return call(self.target_port, (admin.cert, admin.key, self.pki.ca), method, **params)

    def newest_point_ns(self, machine: str) -> int | None:
        points = self.rpc("points", machine_id=machine)
        return max((int(p["time_ns"]) for p in points), default=None)

    def start_agent(self, machine: str, tracker: str, tag_interval: float) -> Proc:
        state = self.work / f"agent-{machine}"
        state.mkdir()
        config = self.work / f"agent-{machine}.toml"
        leaf = self.pki.leaves["agent"]
        write_agent_config(config, machine_id=machine, state_dir=state,
                           process_port=self.process_port, tls_name=TLS_NAME,
                           disks=[self.device], cert=leaf.cert, key=leaf.key,
                           ca=self.pki.ca)  # fmt: skip
        text = config.read_text()
        # The lab's writer fixes these two; the bench varies them.
        changed = re.sub(r"(?m)^tracker = .*$", f'tracker = "{tracker}"', text)
        changed = re.sub(r"(?m)^tag_interval = .*$", f"tag_interval = {tag_interval}", changed)
        assert f'tracker = "{tracker}"' in changed and f"= {tag_interval}" in changed
        config.write_text(changed)
        argv = [sys.executable, "-m", "agent", "run", "--config", str(config),
                "--log-level", os.environ.get("BENCH_AGENT_LOG_LEVEL", "info")]  # fmt: skip
        proc = spawn("agent", argv, self.work / f"agent-{machine}.log")
        self.procs.append(proc)
        return proc

    def agent_disk(self, machine: str) -> dict[str, Any]:
        found = read_agent_status(self.work / f"agent-{machine}")
        return next(iter(found.values()), {})


@contextmanager
def chain(work: Path, mib: int) -> Iterator[Chain]:
    pki = make_pki(work / "pki", ["targetd", "processd", "agent", "admin"])
    image = work / "disk.img"
    disks.make_image(image, mib * MIB)
    device = disks.attach(image)
    mount = work / "mnt"
    procs: list[Proc] = []
    try:
        disks.mount(device, mount)
        fill(mount, mib)
        tport, pport = free_port(), free_port()
        for name, port, extra in (
            ("targetd", tport, ""),
            ("processd", pport,
             f'\n[target]\naddress = "127.0.0.1:{tport}"\ntls_name = "{TLS_NAME}"\n'),
        ):  # fmt: skip
            module = {"targetd": "appliance.target", "processd": "appliance.process"}[name]
            config = daemon_config(work, name, port, pki, extra)
            argv = [sys.executable, "-m", module, "--config", str(config)]
            procs.append(start_daemon(name, argv, work / f"{name}.log", work / f"n-{name}"))
        yield Chain(work, pki, tport, pport, procs, device, mount)
    finally:
        for proc in reversed(procs):
            stop(proc)
        disks.unmount(str(mount))
        disks.detach(device, str(image))


def fill(mount: Path, mib: int) -> None:
    """About half the disk non-zero: random, log-like text, written zeros."""
    quarter = mib // 4
    churn = quarter // 2  # random too: the write loads overwrite it in place
    random_mib, text_mib, zero_mib = quarter - churn, mib * 3 // 16, mib // 16
    line = b"2026-11-26T01:00:00Z INFO replicator: disk %08d chunk %06d acked seq %09d\n"
    with (mount / "churn.bin").open("wb") as f:
        for _ in range(churn):
            f.write(os.urandom(MIB))
    with (mount / "random.bin").open("wb") as f:
        for _ in range(random_mib):
            f.write(os.urandom(MIB))
    with (mount / "app.log").open("wb") as f:
        for i in range(text_mib):
            block = b"".join(line % (i, j, i * 13000 + j) for j in range(MIB // len(line) + 1))
            f.write(block[:MIB])
    with (mount / "zeros.bin").open("wb") as f:
        for _ in range(zero_mib):
            f.write(bytes(MIB))
    os.sync()


# -- measurements --------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def zstd_baseline(device: str, size: int) -> float:
    """`cat disk | zstd -1 > /dev/null`: zstd refuses a device as a named input."""
    started = time.perf_counter()
    with open(device, "rb") as disk:
        subprocess.run(["zstd", "-1", "-T1", "-q", "-c"], stdin=disk, stdout=subprocess.DEVNULL,
                       check=True)  # fmt: skip
    return size / 1e6 / (time.perf_counter() - started)


def wait_point_after(c: Chain, machine: str, after_ns: int, agent: Proc, timeout: float, *,
                     poll: float = 0.1) -> float:  # fmt: skip
    """Seconds until targetd lists a point of `machine` newer than `after_ns`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        newest = c.newest_point_ns(machine)
        if newest is not None and newest > after_ns:
            return time.monotonic() - started
        if os.waitpid(agent.pid, os.WNOHANG)[0]:
            raise RuntimeError("the agent exited:\n" + Path(agent.log).read_text()[-2000:])
        time.sleep(poll)
    raise TimeoutError(f"no point of {machine} newer than the mark in {timeout:.0f} s")


def initial(c: Chain, machine: str, tracker: str, tag_interval: float, *, size: int,
            zstd_mb_s: float) -> tuple[Proc, dict[str, Any]]:  # fmt: skip
    started_ns = time.time_ns()
    agent = c.start_agent(machine, tracker, tag_interval)
    seconds = wait_point_after(c, machine, started_ns, agent, timeout=300)
    mb_s = size / 1e6 / seconds
    return agent, emit({
        "measure": "initial", "tracker": tracker, "seconds": round(seconds, 2),
        "mb_s": round(mb_s, 1), "zstd1_mb_s": round(zstd_mb_s, 1),
        "ratio_to_zstd1": round(mb_s / zstd_mb_s, 3),
        "sent_mib": round(c.agent_disk(machine).get("bytes_sent", 0) / MIB, 1),
        "agent_cpu_s": round(cpu_seconds(agent.pid), 2),
        "agent_cpu_share": round(cpu_seconds(agent.pid) / seconds, 3),
        "agent_rss_hwm_mib": round(vm_kib(agent.pid, "VmHWM") / 1024, 1),
    })  # fmt: skip


DATA_FILES = ("churn.bin", "random.bin", "app.log", "zeros.bin")


def random_writes(mount: Path, count: int, seed: int) -> None:
    """`count` random 4 KiB O_DIRECT overwrites spread over every data file (half the
    disk: the rest is free space, which a mounted filesystem gives no way to write)."""
    import mmap
    import random

    rng = random.Random(seed)  # a new seed each time: rewriting the same bytes is no change
    buffer = mmap.mmap(-1, 4096)
    fds = [os.open(mount / name, os.O_WRONLY | os.O_DIRECT) for name in DATA_FILES]
    blocks = [os.fstat(fd).st_size // 4096 for fd in fds]
    try:
        for _ in range(count):
            buffer[:] = rng.randbytes(4096)
            (i,) = rng.choices(range(len(fds)), weights=blocks)
            os.pwrite(fds[i], buffer, rng.randrange(blocks[i]) * 4096)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
        buffer.close()


def settled_bytes_sent(c: Chain, machine: str) -> int:
    time.sleep(1.2)  # status.json is rewritten every second
    return int(c.agent_disk(machine).get("bytes_sent", 0))


def delta(c: Chain, machine: str, tracker: str, agent: Proc, writes: int, *,
          run: int) -> dict[str, Any]:  # fmt: skip
    # Settled first: nothing left over from the initial copy or the previous run.
    os.kill(agent.pid, signal.SIGUSR1)
    wait_point_after(c, machine, time.time_ns(), agent, timeout=300)
    before = settled_bytes_sent(c, machine)
    random_writes(c.mount, writes, seed=len(machine) * 1000 + ord(tracker[0]) * 10 + run)
    written_ns = time.time_ns()
    os.kill(agent.pid, signal.SIGUSR1)  # the point now, not at the next scheduled tag
    seconds = wait_point_after(c, machine, written_ns, agent, timeout=300, poll=0.02)
    sent = settled_bytes_sent(c, machine) - before
    status = c.agent_disk(machine)
    return emit({
        "measure": "delta", "tracker": tracker, "run": run, "writes_4k": writes,
        "seconds": round(seconds, 3), "sent_mib": round(sent / MIB, 2),
        # The agent's share: from the fsync to the tag it submitted (its clock, taken
        # after the capture); the rest is processd and targetd applying, and our polling.
        "tag_after_s": round(float(status.get("last_tag_time") or 0) - written_ns / 1e9, 3),
        "untagged_rounds": status.get("untagged_rounds"),
        "last_untagged_reason": status.get("last_untagged_reason"),
    })  # fmt: skip


def idle(c: Chain, machine: str, tracker: str, agent: Proc, seconds: float) -> dict[str, Any]:
    """The agent's CPU with nothing written and no tag due: its live drains' fixed cost."""
    time.sleep(1.0)  # the last delta's sends and acks settle
    cpu0, wall0 = cpu_seconds(agent.pid), time.monotonic()
    time.sleep(seconds)
    cpu, wall = cpu_seconds(agent.pid) - cpu0, time.monotonic() - wall0
    return emit({"measure": "idle", "tracker": tracker, "seconds": round(wall, 1),
                 "agent_cpu_s": round(cpu, 3),
                 "agent_cpu_share": round(cpu / wall, 4)})  # fmt: skip


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in ("seconds", "tag_after_s", "sent_mib", "literal_mib") if k in runs[0]]
    return emit({
        "measure": "delta_median", "tracker": runs[0]["tracker"], "runs": len(runs),
        **{k: round(statistics.median(r[k] for r in runs), 3) for k in keys},
    })  # fmt: skip


def rsync_delta(c: Chain, image: Path, writes: int, run: int) -> dict[str, Any]:
    if shutil.which("rsync") is None:
        return emit({"measure": "delta", "tracker": "rsync", "skipped": "rsync not installed"})
    os.sync()
    previous = c.work / "previous.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(previous)], check=True)
    random_writes(c.mount, writes, seed=3 + run)
    os.sync()  # the image file then holds the writes (loop writes through its page cache)
    started = time.perf_counter()
    # --ignore-times: its size+mtime quick check would otherwise skip the file unread
    # (loop writes need not touch the image's mtime); a block image wants the delta.
    argv = ["rsync", "--no-whole-file", "--inplace", "--ignore-times", "--stats"]
    done = subprocess.run([*argv, str(image), str(previous)], check=True, capture_output=True,
                          text=True)  # fmt: skip
    seconds = time.perf_counter() - started
    previous.unlink()

    def stat(label: str) -> int:
        m = re.search(rf"^{label}: ([\d,.]+)", done.stdout, re.MULTILINE)
        return int(m[1].replace(",", "").replace(".", "")) if m else -1

    return emit({
        "measure": "delta", "tracker": "rsync", "run": run, "writes_4k": writes,
        "seconds": round(seconds, 3), "sent_mib": round(stat("Total bytes sent") / MIB, 2),
        "literal_mib": round(stat("Literal data") / MIB, 2),
    })  # fmt: skip


def rpo(c: Chain, machine: str, agent: Proc, rate: float, seconds: float) -> dict[str, Any]:
    churn = c.mount / "churn.bin"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(churn), str(churn.stat().st_size), str(rate),
         str(seconds + 5)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(5)  # the writer reaches its rate, the tags their rhythm
        cpu0, wall0, rss_max = cpu_seconds(agent.pid), time.monotonic(), 0
        samples: list[float] = []
        while time.monotonic() - wall0 < seconds:
            newest = c.newest_point_ns(machine)
            if newest is not None:
                samples.append((time.time_ns() - newest) / 1e9)
            rss_max = max(rss_max, vm_kib(agent.pid, "VmRSS"))
            time.sleep(max(0.0, 0.5 - (time.monotonic() - wall0) % 0.5))
        cpu = cpu_seconds(agent.pid) - cpu0
        wall = time.monotonic() - wall0
        achieved = float((writer.communicate(timeout=30)[0] or "nan").strip())
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    samples.sort()
    status = c.agent_disk(machine)
    return emit({
        "measure": "rpo", "rate_mb_s": rate, "achieved_mb_s": round(achieved, 1),
        "seconds": round(wall, 1), "samples": len(samples),
        "rpo_p50_s": round(statistics.median(samples), 2),
        "rpo_p99_s": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
        "rpo_max_s": round(samples[-1], 2),
        "agent_cpu_s": round(cpu, 2), "agent_cpu_share": round(cpu / wall, 3),
        "agent_rss_max_mib": round(rss_max / 1024, 1),
        "agent_rss_hwm_mib": round(vm_kib(agent.pid, "VmHWM") / 1024, 1),
        "untagged_rounds": status.get("untagged_rounds"),
        "last_untagged_reason": status.get("last_untagged_reason"),
    })  # fmt: skip


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.mib * MIB
    writes = size // 100 // 4096  # 1% of the disk in 4 KiB writes
    results: list[dict[str, Any]] = []
    medians: dict[str, dict[str, Any]] = {}
    with chain(work, args.mib) as c:
        zstd = statistics.median(zstd_baseline(c.device, size) for _ in range(2))
        for machine, tracker in (("bench-t", "tracefs"), ("bench-s", "scan")):
            if tracker not in args.trackers.split(","):
                continue
            agent, result = initial(c, machine, tracker, DELTA_TAG_INTERVAL, size=size,
                                    zstd_mb_s=zstd)  # fmt: skip
            results.append(result)
            runs = [
                delta(c, machine, tracker, agent, writes, run=n) for n in range(args.delta_runs)
            ]
            results += runs
            medians[tracker] = median_of(runs)
            results.append(idle(c, machine, tracker, agent, IDLE_SECONDS))
            stop(agent)
        if shutil.which("rsync") is None:
            results.append(emit({"measure": "delta", "tracker": "rsync",
                                 "skipped": "rsync not installed"}))  # fmt: skip
        else:
            runs = [rsync_delta(c, work / "disk.img", writes, n) for n in range(args.delta_runs)]
            results += runs
            medians["rsync"] = median_of(runs)
            results.append(emit({
                "measure": "delta_ratio", **{
                    f"rsync_over_{t}": round(medians["rsync"]["seconds"] / m["seconds"], 2)
                    for t, m in medians.items() if t != "rsync" and m["seconds"] > 0
                }, "targets": {"rsync_over_tracefs": 20, "rsync_over_scan": 2},
            }))  # fmt: skip
        results += medians.values()
        if not args.no_rpo:
            agent, result = initial(c, "bench-r", "tracefs", 5.0, size=size, zstd_mb_s=zstd)
            results.append(result)
            for rate in (20.0, 54.0):
                results.append(rpo(c, "bench-r", agent, rate, args.rpo_seconds))
            stop(agent)
    return {"bench": "agent", "mib": args.mib, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=2048, help="disk size (the issue's 2 GiB)")
    parser.add_argument("--delta-runs", type=int, default=3, help="delta runs per tracker")
    parser.add_argument("--no-rpo", action="store_true", help="skip the RPO part (c)")
    parser.add_argument("--trackers", default="tracefs,scan", help="for (a) and (b)")
    parser.add_argument("--rpo-seconds", type=float,
                        default=float(os.environ.get("BENCH_AGENT_RPO_SECONDS", "90")))  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("zstd") is None:
        print(json.dumps({"bench": "agent", "skipped": "needs root and zstd"}))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-agent-", dir="/var/tmp") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
