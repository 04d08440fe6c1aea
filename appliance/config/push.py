"""The push-install job: a process server installs the agent on a host over SSH.

Steps (the job's subject is "push:HOST", so the agent's own protect job, submitted
when it enrols under its machine name, does not conflict with this one):

- place: the process server that will serve the machine (the least loaded), fixed in
  the job's result;
- install: that process server's `push_install` control RPC (appliance.process.push),
  which probes, copies, installs, enrols and starts the agent; its report goes into
  the job's result. The private key is never in the job's params (the inventory is on
  disk): the service holds it in memory from PushInstall until this step takes it, so
  a configuration-server restart before the install fails the job: run it again;
- enrolled: wait until the machine is in the inventory (the agent enrolled).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance.config.errors import ConfigServerError, NotFound
from appliance.config.failover_base import job_result, record_result
from appliance.config.jobs import Definitions, JobContext, JobFailed, Step
from appliance.config.model import JobKind
from appliance.config.targets import RemoteRefused

__all__ = ["PushOps", "definitions", "subject"]

INSTALL_TIMEOUT = 600.0  # one RPC: probe, copy, venv, enrolment, start
ENROL_WAIT = 300.0


@dataclass(frozen=True)
class PushOps:
    """What the steps need from the service."""

    place: Callable[[], tuple[str, str]]  # -> (process server name, its address)
    call: Callable[[str, str, dict[str, Any], float], Awaitable[Any]]  # address, method, ...
    passphrase: Callable[[], str]
    take_key: Callable[[str], str | None]  # job id -> the key's text, forgotten there
    server: str  # HOST:PORT hosts enrol with, unless the job's params say otherwise


def subject(host: str) -> str:
    return f"push:{host}"


def definitions(ops: PushOps) -> Definitions:
    def push_install(params: dict[str, Any]) -> list[Step]:
        return [
            Step("place", _place(ops)),
            Step("install", _install(ops)),
            Step("enrolled", _enrolled, timeout=ENROL_WAIT),
        ]

    return {JobKind.PUSH_INSTALL: push_install}


def _place(ops: PushOps) -> Callable[[JobContext], Awaitable[bool]]:
    async def run(ctx: JobContext) -> bool:
        if "process_server" not in job_result(ctx):
            name, address = ops.place()
            record_result(ctx, process_server=name, address=address)
        return True

    return run


def _install(ops: PushOps) -> Callable[[JobContext], Awaitable[bool]]:
    async def run(ctx: JobContext) -> bool:
        result = job_result(ctx)
        if "report" in result:
            return True
        p = ctx.params
        key = ops.take_key(ctx.job_id)
        if not key:
            raise JobFailed(
                f"the credentials for {p['host']} are gone (they are held in memory only, "
                "and the configuration server restarted): run push-install again"
            )
        try:
            passphrase = ops.passphrase()
        except ConfigServerError as exc:
            raise JobFailed(exc.message) from None
        request = {
            "host": p["host"], "port": p.get("port", 22), "user": p.get("user", "root"),
            "key": key, "server": p.get("server") or ops.server, "passphrase": passphrase,
            "disks": p.get("disks", []), "machine_id": p["machine"],
            "accept_fingerprint": p.get("accept_fingerprint"), "prefix": p.get("prefix", ""),
            "start_without_systemd": bool(p.get("start_without_systemd", False)),
        }  # fmt: skip
        try:
            report = await ops.call(result["address"], "push_install", request, INSTALL_TIMEOUT)
        except RemoteRefused as exc:
            raise JobFailed(_refusal(p["host"], exc.detail)) from None
        except ConfigServerError as exc:
            raise JobFailed(f"process server {result['process_server']}: {exc.message}") from None
        record_result(ctx, report=report)
        return True

    return run


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
