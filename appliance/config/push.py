"""The push-install and push-uninstall jobs: a process server installs (removes) the
agent on a host over SSH.

push-install steps (the job's subject is "push:HOST", so the agent's own protect job,
submitted when it enrols under its machine name, does not conflict with this one):

- place: the process server that will serve the machine (the least loaded), fixed in
  the job's result;
- install: that process server's `push_install` control RPC (appliance.process.push),
  which probes, copies, installs, enrols and starts the agent; its report goes into
  the job's result. The credentials (a private key or a password) are never in the
  job's params (the inventory is on disk): the service holds them in memory from
  PushInstall until this step takes them, so a configuration-server restart before
  the install fails the job: run it again;
- enrolled: wait until the machine is in the inventory (the agent enrolled).

push-uninstall: place (the process server serving the machine: its known hosts hold
the host's key), uninstall (`push_uninstall`), forget (the machine's certificates
revoked, the machine removed from the inventory).

Progress: the RPC answers once, at the end, so the step starts it as a task and
returns; each time the engine polls the step again (every couple of seconds) it asks
the process server's `push_status` for the engine's steps so far and records the
latest in the job's result ("detail", shown by `secondsitectl job`, and "steps") and
the step's percent. Polling is the simplest honest choice: it needs no streaming in
the one-request-one-answer wire protocol, and what is shown is what the process
server has done, not an estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance.config.errors import ConfigServerError, NotFound
from appliance.config.failover_base import job_result, record_result
from appliance.config.jobs import Definitions, JobContext, JobFailed, Step
from appliance.config.model import JobKind, ServerRole
from appliance.config.targets import RemoteRefused

__all__ = ["PushOps", "credentials", "definitions", "subject"]

INSTALL_TIMEOUT = 600.0  # one RPC: probe, copy, venv, enrolment, start
STATUS_TIMEOUT = 10.0
ENROL_WAIT = 300.0
#: How far through the remote run each engine step is (appliance.push.install.Step).
STEP_PERCENT = {"host-key": 2, "probe": 8, "copy": 15, "install": 35, "configure": 70,
                "enrol": 75, "service": 85, "cleanup": 95, "remove": 50}  # fmt: skip


@dataclass(frozen=True)
class PushOps:
    """What the steps need from the service."""

    place: Callable[[], tuple[str, str]]  # -> (process server name, its address)
    call: Callable[[str, str, dict[str, Any], float], Awaitable[Any]]  # address, method, ...
    passphrase: Callable[[], str]
    take_key: Callable[[str], str | None]  # job id -> credentials(), forgotten there
    server: str  # HOST:PORT hosts enrol with, unless the job's params say otherwise
    revoke: Callable[[str], Awaitable[None]] | None = None  # a name's certificates


def subject(host: str) -> str:
    return f"push:{host}"


def credentials(options: dict[str, Any]) -> str:
    """The secret part of PushInstall/PushUninstall's options, as the one text the
    service holds in memory for the job (take_key gives it back)."""
    return json.dumps({k: options[k] for k in ("key", "password") if options.get(k)})


def definitions(ops: PushOps) -> Definitions:
    def push_install(params: dict[str, Any]) -> list[Step]:
        return [
            Step("place", _place(ops)),
            Step("install", _remote(ops, "push_install"), timeout=INSTALL_TIMEOUT + 60),
            Step("enrolled", _enrolled, timeout=ENROL_WAIT),
        ]

    def push_uninstall(params: dict[str, Any]) -> list[Step]:
        return [
            Step("place", _place(ops, serving=True)),
            Step("uninstall", _remote(ops, "push_uninstall"), timeout=INSTALL_TIMEOUT + 60),
            Step("forget", _forget(ops)),
        ]

    return {JobKind.PUSH_INSTALL: push_install, JobKind.PUSH_UNINSTALL: push_uninstall}


def _place(ops: PushOps, *, serving: bool = False) -> Callable[[JobContext], Awaitable[bool]]:
    async def run(ctx: JobContext) -> bool:
        if "process_server" not in job_result(ctx):
            found = _serving(ctx) if serving else None
            name, address = found or ops.place()
            record_result(ctx, process_server=name, address=address)
        return True

    return run


def _serving(ctx: JobContext) -> tuple[str, str] | None:
    """The process server the machine reports through, if it is known."""
    try:
        name = ctx.inventory.machine(ctx.params["machine"])["process_server"]
    except NotFound:
        return None
    for server in ctx.inventory.servers(ServerRole.PROCESS.value):
        if server["name"] == name and server["address"]:
            return str(name), str(server["address"])
    return None


def _remote(ops: PushOps, method: str) -> Callable[[JobContext], Awaitable[bool]]:
    running: dict[str, asyncio.Future[Any]] = {}  # job id -> the RPC, while it runs

    async def run(ctx: JobContext) -> bool:
        result = job_result(ctx)
        if "report" in result:
            return True
        task = running.get(ctx.job_id)
        if task is None:
            request = _request(ops, ctx, method)
            running[ctx.job_id] = asyncio.ensure_future(
                ops.call(result["address"], method, request, INSTALL_TIMEOUT)
            )
            return False
        if not task.done():
            await _show(ops, ctx, result["address"])
            return False
        del running[ctx.job_id]
        try:
            report = task.result()
        except RemoteRefused as exc:
            await _show(ops, ctx, result["address"])
            raise JobFailed(_refusal(ctx.params["host"], exc.detail)) from None
        except ConfigServerError as exc:
            raise JobFailed(f"process server {result['process_server']}: {exc.message}") from None
        await _show(ops, ctx, result["address"])
        record_result(ctx, report=report)
        return True

    return run


def _request(ops: PushOps, ctx: JobContext, method: str) -> dict[str, Any]:
    p = ctx.params
    secret = ops.take_key(ctx.job_id)
    if not secret:
        raise JobFailed(
            f"the credentials for {p['host']} are gone (they are held in memory only, "
            f"and the configuration server restarted): run {ctx.kind.value} again"
        )
    request: dict[str, Any] = json.loads(secret) | {
        "host": p["host"], "port": p.get("port", 22), "user": p.get("user", "root"),
        "accept_fingerprint": p.get("accept_fingerprint"), "prefix": p.get("prefix", ""),
        "run": ctx.job_id,
    }  # fmt: skip
    if method == "push_install":
        try:
            passphrase = ops.passphrase()
        except ConfigServerError as exc:
            raise JobFailed(exc.message) from None
        request |= {
            "server": p.get("server") or ops.server, "passphrase": passphrase,
            "disks": p.get("disks", []), "machine_id": p["machine"],
            "start_without_systemd": bool(p.get("start_without_systemd", False)),
        }  # fmt: skip
    return request


async def _show(ops: PushOps, ctx: JobContext, address: str) -> None:
    """The remote run's steps so far into the job (best effort: a missed poll is not
    a failure, the next one catches up)."""
    try:
        status = await ops.call(address, "push_status", {"run": ctx.job_id}, STATUS_TIMEOUT)
    except ConfigServerError:
        return
    steps = [s for s in status.get("steps", []) if isinstance(s, dict)]
    if not steps:
        return
    last = steps[-1]
    ctx.progress(STEP_PERCENT.get(str(last.get("step")), 0))
    record_result(
        ctx,
        detail=f"{last.get('step')}: {last.get('message')}",
        steps=[f"{s.get('step')}: {s.get('message')}" for s in steps],
    )


def _refusal(host: str, detail: dict[str, Any]) -> str:
    kind, message = detail.get("error", "Failed"), detail.get("message", "")
    if kind == "UnknownHostKey" and detail.get("fingerprint"):
        fingerprint = detail["fingerprint"]
        return (
            f"{host} presents the host key {fingerprint}, not trusted yet: check it on the "
            f"host (ssh-keygen -lf), then run again with --accept-fingerprint {fingerprint}"
        )
    hint = detail.get("hint")
    return f"{kind}: {message}" + (f" ({hint})" if hint else "")


async def _enrolled(ctx: JobContext) -> bool:
    try:
        ctx.inventory.machine(ctx.params["machine"])
    except NotFound:
        return False
    return True


def _forget(ops: PushOps) -> Callable[[JobContext], Awaitable[bool]]:
    async def run(ctx: JobContext) -> bool:
        """Revoke the uninstalled agent's certificates and drop the machine: its
        enrolment would otherwise still let anyone holding its key report."""
        report = job_result(ctx).get("report") or {}
        name = report.get("machine") or ctx.params["machine"]
        try:
            if ops.revoke is not None:
                await ops.revoke(name)
            else:
                ctx.inventory.revoke(name, ctx.clock())
        except NotFound:
            pass  # never enrolled (or revoked by an earlier run of this step)
        with contextlib.suppress(NotFound):  # an earlier run of this step removed it
            ctx.inventory.delete_machine(name)
        ctx.inventory.add_event("info", name, "uninstalled",
                                f"agent removed from {ctx.params['host']} by push-uninstall, "
                                "certificates revoked, machine removed", ctx.clock())  # fmt: skip
        record_result(ctx, machine=name)
        return True

    return run
