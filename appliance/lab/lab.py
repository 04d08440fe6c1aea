"""The lab's operations: up, down, status, points, materialize, churn."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.config.ca import CertificateAuthority
from appliance.config.model import ComponentKind
from appliance.daemon.cli import OperatorError, Unavailable
from appliance.dbus.client import Config1Client
from appliance.lab import disks as loopfs
from appliance.lab import rpc
from appliance.lab.agent import enrol_agent, read_agent_status, start_agent, write_agent_config
from appliance.lab.bus import start_private_bus
from appliance.lab.procs import alive, exited, free_port, spawn, start_notified, stop, strays
from appliance.lab.state import LabDisk, LabState, Proc

MACHINE_ID = "lab"
READY_TIMEOUT = 60.0
STOP_ORDER = ("churn", "agent", "processd", "targetd", "configd", "dbus")
POLICY = "org.secondsite.Config1.conf"
CONFIGD_EXTRA = """
[dbus]
bus = "{bus}"
[reports]
interval = 2.0
[health]
agent_timeout = 30.0
server_timeout = 30.0
"""


def default_state_dir() -> Path:
    return Path("/var/lib/secondsite/lab") if os.geteuid() == 0 else Path(".lab")


def _daemon_config(state: Path, name: str, port: int, extra: str = "") -> str:
    # No [tls]: each daemon uses what it enrolled (STATE/tls/).
    return f"""[server]
name = "lab-{name}"
listen = "127.0.0.1:{port}"
state_dir = "{state / name}"
{extra}"""


def _policy_file() -> Path:
    """The D-Bus policy: from the checkout (units/), else where the image installs it."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "units" / "dbus-1" / "system.d" / POLICY,
        Path("/usr/share/dbus-1/system.d") / POLICY,
    ):
        if candidate.is_file():
            return candidate
    raise Unavailable(f"the D-Bus policy {POLICY} is not installed",
                      "run the lab from a checkout, or install the appliance")  # fmt: skip


def _require_root() -> None:
    if os.geteuid() != 0:
        raise OperatorError(
            "the lab needs root (loop devices, mounts, the agent's block tracing)",
            "run it with sudo",
        )
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed", "install util-linux and e2fsprogs")


def _lab_is_up(lab: LabState) -> bool:
    return any(alive(p) for p in lab.procs.values()) or any(
        loopfs.is_mounted(d.mount) for d in lab.disks if d.mount
    )


def up(state_dir: Path, size: int, ndisks: int, churn_mbps: float) -> LabState:
    _require_root()
    if ndisks < 1:
        raise OperatorError("--disks must be at least 1")
    if size < 32 << 20:
        raise OperatorError("--size must be at least 32M (an ext4 with a journal)")
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    old = LabState.load(state_dir)
    if old is not None:
        if _lab_is_up(old):
            raise OperatorError(
                f"a lab is already up in {state_dir}", "take it down with 'secondsite-lab down'"
            )
        down(state_dir)  # the leftovers of a crashed lab
    lab = LabState(str(state_dir), MACHINE_ID, size)
    lab.save()
    try:
        _bring_up(lab, state_dir, ndisks, churn_mbps)
    except BaseException:
        down(state_dir, quiet=True)
        raise
    return lab


def _bring_up(lab: LabState, state: Path, ndisks: int, churn_mbps: float) -> None:
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable

    # A private system-like bus with our policy, and the configuration server on it.
    bus = start_private_bus(
        state / "bus", (_policy_file(),), new_session=True, log=logs / "dbus.log"
    )
    lab.bus_address = bus.address
    lab.procs["dbus"] = Proc("dbus", bus.process.pid, bus.argv, str(logs / "dbus.log"))
    lab.save()
    lab.config_port = free_port()
    config = state / "configd.toml"
    config.write_text(_daemon_config(state, "configd", lab.config_port, CONFIGD_EXTRA.format(
        bus=bus.address)))  # fmt: skip
    _started(lab, "configd", [py, "-m", "appliance.config", "--config", str(config)], logs, state)
    passphrase = state / "passphrase"
    with Config1Client(bus.address) as client:
        phrase = client.call("GetPassphrase")["passphrase"]
    passphrase.touch(mode=0o600)
    passphrase.write_text(phrase + "\n")
    server = f"127.0.0.1:{lab.config_port}"

    # The master target and the process server enrol with the passphrase, then start.
    lab.target_port = free_port()
    lab.process_port = free_port()
    for name, module, port, extra in (
        ("targetd", "appliance.target", lab.target_port, ""),
        ("processd", "appliance.process", lab.process_port,
         f'[target]\naddress = "127.0.0.1:{lab.target_port}"\n'),
    ):  # fmt: skip
        config = state / f"{name}.toml"
        config.write_text(_daemon_config(state, name, port, extra))
        argv = [py, "-m", module, "--config", str(config)]
        _enrol(argv, server, passphrase, logs / f"{name}.log")
        _started(lab, name, argv, logs, state)

    # The lab's own admin certificate, for the master target's control RPCs.
    ca = CertificateAuthority.open_or_create(state / "configd" / "ca")
    cert, key = ca.issue_local("lab-admin", ComponentKind.ADMIN, [], state / "pki")
    lab.pki = {"ca": str(ca.ca_path), "cert": str(cert), "key": str(key)}
    lab.save()

    for i in range(ndisks):
        disk = LabDisk(f"disk{i}", str(state / "images" / f"disk{i}.img"))
        Path(disk.image).parent.mkdir(exist_ok=True)
        lab.disks.append(disk)
        loopfs.make_image(Path(disk.image), lab.size)
        disk.device = loopfs.attach(Path(disk.image))
        lab.save()
        mountpoint = state / "mnt" / disk.name
        loopfs.mount(disk.device, mountpoint)
        disk.mount = str(mountpoint)
        lab.save()
        loopfs.seed(mountpoint, lab.size)

    agent_state = state / "agent"
    agent_state.mkdir(exist_ok=True)
    config = state / "agent.toml"
    write_agent_config(config, machine_id=lab.machine_id, state_dir=agent_state,
                       disks=[d.device for d in lab.disks])  # fmt: skip
    enrol_agent(config, server, passphrase, logs / "agent.log")
    (agent_state / "status.json").unlink(missing_ok=True)
    proc = start_agent(config, logs / "agent.log")
    lab.procs["agent"] = proc
    lab.save()
    deadline = time.monotonic() + READY_TIMEOUT
    while not read_agent_status(agent_state):
        if exited(proc):
            raise Unavailable("the agent exited at start", f"see its log {proc.log}")
        if time.monotonic() > deadline:
            raise Unavailable("the agent wrote no status in time", f"see its log {proc.log}")
        time.sleep(0.2)

    if churn_mbps > 0:
        set_churn(state, churn_mbps, lab)


def _enrol(argv: list[str], server: str, passphrase: Path, log: Path) -> None:
    done = subprocess.run([*argv, "--enroll", server, "--passphrase-file", str(passphrase)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    with log.open("a") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise Unavailable(f"{Path(argv[2]).name} could not enrol: {done.stderr.strip()}",
                          f"see {log}")  # fmt: skip


def _started(lab: LabState, name: str, argv: list[str], logs: Path, state: Path) -> Proc:
    proc = start_notified(name, argv, logs / f"{name}.log", state / f"notify-{name}", READY_TIMEOUT)
    lab.procs[name] = proc
    lab.save()
    return proc


def _load(state_dir: Path) -> LabState:
    lab = LabState.load(state_dir.resolve())
    if lab is None:
        raise OperatorError(
            f"no lab in {state_dir}", "start one with 'secondsite-lab up' (or pass --state-dir)"
        )
    return lab


def set_churn(state_dir: Path, mbps: float, lab: LabState | None = None) -> None:
    """(Re)start the churn generator at `mbps` MB/s; 0 stops it."""
    lab = lab or _load(state_dir)
    if mbps < 0:
        raise OperatorError("--rate must be 0 (stop) or more")
    old = lab.procs.pop("churn", None)
    if old is not None:
        stop(old)
    lab.churn_mbps = mbps
    if mbps > 0:
        mounts = [d.mount for d in lab.disks if d.mount]
        if not mounts or not alive(lab.procs.get("agent") or Proc("", 0, [], "")):
            raise OperatorError("the lab is not up", "start it with 'secondsite-lab up'")
        argv = [sys.executable, "-m", "appliance.lab.churn", "--rate", str(mbps), *mounts]
        lab.procs["churn"] = spawn("churn", argv, Path(lab.state_dir) / "logs" / "churn.log")
    lab.save()


def down(state_dir: Path, quiet: bool = False) -> list[str]:
    """Stop everything lab.json records, skipping what is already gone; unmount and
    detach. Removes nothing else (images, logs and replicas stay). Returns what it did."""
    lab = LabState.load(state_dir.resolve())
    if lab is None:
        return []
    done: list[str] = []
    errors: list[str] = []
    for name in STOP_ORDER:
        proc = lab.procs.get(name)
        if proc is not None and alive(proc):
            stop(proc)
            done.append(f"stopped {name} (pid {proc.pid})")
    # Started but never recorded (a crash mid-`up`): found by the state directory in
    # their command line (every lab process takes its config or state from there).
    for proc in strays(lab.state_dir + "/"):
        if alive(proc):
            stop(proc)
            done.append(f"stopped an unrecorded {Path(proc.argv[0]).name} (pid {proc.pid})")
    for disk in lab.disks:
        try:
            if disk.mount and loopfs.is_mounted(disk.mount):
                loopfs.unmount(disk.mount)
                done.append(f"unmounted {disk.mount}")
            if disk.device and loopfs.backing_file(disk.device):
                loopfs.detach(disk.device, disk.image)
                done.append(f"detached {disk.device}")
        except OperatorError as exc:
            errors.append(exc.message)
    if errors:
        if quiet:
            return done
        raise Unavailable("; ".join(errors), "run 'secondsite-lab down' again, or see losetup -a")
    lab.procs.clear()
    lab.churn_mbps = 0.0
    lab.save()
    return done


def _rpc(lab: LabState, port: int, method: str, **params: Any) -> Any:
    p = lab.pki
    return rpc.call(port, (Path(p["cert"]), Path(p["key"]), Path(p["ca"])), method, **params)


def points(state_dir: Path) -> list[dict[str, Any]]:
    lab = _load(state_dir)
    result: list[dict[str, Any]] = _rpc(lab, lab.target_port, "points", machine_id=lab.machine_id)
    return sorted(result, key=lambda p: int(p["time_ns"]))


@dataclass
class DiskStatus:
    disk: str
    device: str
    disk_id: str
    initial_percent: float | None
    backlog_bytes: int | None
    rpo_seconds: float | None
    points: int
    phase: str | None


def status(state_dir: Path) -> dict[str, Any]:
    lab = _load(state_dir)
    procs = {name: alive(p) for name, p in lab.procs.items()}
    agent = read_agent_status(Path(lab.state_dir) / "agent")
    by_device = {str(s.get("device")): (k, s) for k, s in agent.items()}
    backlog: dict[str, int] = {}
    pts: list[dict[str, Any]] = []
    if procs.get("processd"):
        with contextlib.suppress(OperatorError):
            for d in _rpc(lab, lab.process_port, "status")["disks"]:
                backlog[d["disk_id"]] = int(d["backlog_bytes"])
    if procs.get("targetd"):
        with contextlib.suppress(OperatorError):
            pts = _rpc(lab, lab.target_port, "points", machine_id=lab.machine_id)
    now_ns = time.time_ns()
    disks = []
    for disk in lab.disks:
        disk_id, st = by_device.get(disk.device, (f"{lab.machine_id}-{Path(disk.device).name}", {}))
        mine = [p for p in pts if disk_id in p.get("disks", [disk_id]) and p.get("usable", True)]
        newest = max((int(p["time_ns"]) for p in mine), default=None)
        initial = st.get("initial") or {}
        disks.append(
            DiskStatus(
                disk=disk.name,
                device=disk.device,
                disk_id=disk_id,
                initial_percent=initial.get("percent"),
                backlog_bytes=backlog.get(disk_id),
                rpo_seconds=None if newest is None else round((now_ns - newest) / 1e9, 1),
                points=len(mine),
                phase=st.get("phase"),
            )
        )
    return {
        "state_dir": lab.state_dir,
        "machine_id": lab.machine_id,
        "processes": procs,
        "churn_mbps": lab.churn_mbps,
        "disks": [asdict(d) for d in disks],
        "bus": lab.bus_address,
        "machine": _configd_view(lab) if procs.get("configd") else None,
    }


def _configd_view(lab: LabState) -> dict[str, Any] | None:
    """The machine as the configuration server sees it (state, RPO), or None."""
    try:
        with Config1Client(lab.bus_address, timeout=5) as client:
            record: dict[str, Any] = client.call("GetMachine", lab.machine_id)
    except Exception:  # noqa: BLE001 - the lab status shows what it can
        return None
    keep = ("state", "rpo_seconds", "rpo_threshold_s", "process_server", "master_target")
    return {k: record.get(k) for k in keep}


def materialize(state_dir: Path, point: str, out: Path) -> list[Path]:
    """The point's disk images as plain (sparse) files in `out`, named after the disks."""
    lab = _load(state_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-labcopy-{time.time_ns()}"
    result = _rpc(lab, lab.target_port, "materialize",
                  machine_id=lab.machine_id, tag_id=point, name=suffix)  # fmt: skip
    names = {f"{lab.machine_id}-{Path(d.device).name}": d.name for d in lab.disks}
    # A disk id follows the image, not the loop device's name (agent.disk_ids): ask
    # the agent which id each device has.
    agent = read_agent_status(Path(lab.state_dir) / "agent")
    names |= {k: d.name for d in lab.disks for k, s in agent.items() if s.get("device") == d.device}
    made = []
    for descriptor in map(Path, result["vmdks"]):
        flat = descriptor.with_name(descriptor.stem + "-flat.vmdk")
        disk_id = descriptor.stem.removesuffix(suffix)
        dest = out / f"{names.get(disk_id, disk_id)}.img"
        try:
            _sparse_copy(flat, dest)
        finally:  # the copy on the target is scratch: do not let it fill the datastore
            flat.unlink(missing_ok=True)
            descriptor.unlink(missing_ok=True)
        made.append(dest)
    return made


def _sparse_copy(src: Path, dest: Path, chunk: int = 1 << 20) -> None:
    zero = bytes(chunk)
    with src.open("rb") as fin, dest.open("wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        while block := fin.read(chunk):
            if block == zero[: len(block)]:
                fout.seek(len(block), os.SEEK_CUR)
            else:
                fout.write(block)
        fout.truncate(size)
