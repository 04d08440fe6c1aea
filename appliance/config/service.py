"""The configuration server's core: inventory, enrolment, reports, health, jobs.

`ConfigService` implements `ConfigApi` (what D-Bus and secondsitectl reach) and what
the components reach over the wire protocol (enrolment registration, reports). It runs
on the asyncio loop; the inventory is SQLite, touched from this loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from appliance import __version__
from appliance.config import failback, failover, health, plans, protection, push
from appliance.config.api import (
    AlertChanged,
    MachineStateChanged,
    Record,
    Signal,
    Summary,
)
from appliance.config.errors import (
    ConfigServerError,
    InvalidArgument,
    NotAuthorised,
    NotFound,
)
from appliance.config.groups import GroupEntryPoints
from appliance.config.inventory import Inventory
from appliance.config.jobs import JobEngine, JobFailed
from appliance.config.model import (
    ComponentKind,
    JobKind,
    JobState,
    MachineState,
    ServerRole,
)
from appliance.config.passphrase import PassphraseStore
from appliance.config.reports import (
    AgentReport,
    ReportBuffer,
    parse_process_disks,
    parse_target_points,
)
from appliance.config.service_failover import FailoverEntryPoints
from appliance.config.targets import TargetCall
from appliance.config.validation import name as _name
from appliance.config.vcenters import VCenterStore

log = logging.getLogger(__name__)

#: Calls a master target's control RPC: (address, method, params) -> result.
#: Calls a process server's control RPC: (address, method, params, timeout) -> result.
PushCall = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]


@dataclass(frozen=True)
class ServiceSettings:
    health: health.HealthSettings = field(default_factory=health.HealthSettings)
    flush_interval: float = 1.0
    monitor_interval: float = 2.0
    report_interval: float = 10.0  # told to components in every answer
    auto_protect: bool = True  # an agent that enrols gets an enable-protection job
    job_poll: float = 2.0  # waiting job steps look again this often (reports wake them sooner)
    address: str = ""  # HOST:PORT hosts enrol with (push installation's default)


class ConfigService(GroupEntryPoints, FailoverEntryPoints):
    def __init__(
        self,
        inventory: Inventory,
        passphrases: PassphraseStore,
        settings: ServiceSettings = ServiceSettings(),
        *,
        clock: Callable[[], float] = time.time,
        target_call: TargetCall | None = None,
        vcenters: VCenterStore | None = None,
        push_call: PushCall | None = None,
    ) -> None:
        self.inventory = inventory
        self.passphrases = passphrases
        self.settings = settings
        self._clock = clock
        self._target_call = target_call
        self._listeners: list[Callable[[Signal], None]] = []
        self._buffer = ReportBuffer()
        self._newest: dict[str, float] = {}  # newest point time per machine, as last reported
        # What reports compare against, kept here so that a thousand machines reporting
        # every few seconds do not each cost a query for what rarely changes.
        self._disk_ids: dict[str, frozenset[str]] = {}
        self._open_alerts = {(a["subject"], a["kind"]) for a in inventory.alerts(False)}
        #: Called with every serial revoked, so the listener refuses them at once.
        self.on_revoke: Callable[[set[str]], object] | None = None
        self.vcenters = vcenters
        definitions = protection.definitions(self)
        if target_call is not None and vcenters is not None:
            ops = failover.ServiceOps(target_call, vcenters, self.agent_alive)
            definitions |= failover.definitions(ops)
            definitions |= failback.definitions(ops)
            definitions |= plans.definitions(self._submit_child, self.lacking_point)
        self._push_call = push_call
        self._push_keys: dict[str, str] = {}  # job id -> credentials: memory only, never stored
        if push_call is not None:
            pushing = push.PushOps(self._push_place, push_call, self._push_passphrase,
                                   self._take_push_key, settings.address,
                                   self.revoke)  # fmt: skip
            definitions |= push.definitions(pushing)
        self.engine = JobEngine(inventory, definitions, self._emit, clock, poll=settings.job_poll)

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Resume unfinished jobs, then flush reports and assess health until cancelled."""
        resumed = self.engine.resume()
        if resumed:
            log.info("resumed %d unfinished jobs", resumed)
        next_monitor = 0.0
        try:
            while True:
                await asyncio.sleep(self.settings.flush_interval)
                self.flush()
                if self._clock() >= next_monitor:
                    self.monitor()
                    next_monitor = self._clock() + self.settings.monitor_interval
        finally:
            with contextlib.suppress(Exception):
                self.flush()
            await self.engine.close()

    # -- signals -------------------------------------------------------------------

    def subscribe(self, listener: Callable[[Signal], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _emit(self, signal: Signal) -> None:
        for listener in list(self._listeners):
            try:
                listener(signal)
            except Exception:
                log.exception("signal listener failed")

    # -- enrolment and reports (from the wire protocol) ------------------------------

    def register(self, name: str, kind: ComponentKind, facts: dict[str, Any]) -> Record:
        """A component enrolled: record it; its assignment is the answer."""
        now = self._clock()
        if kind is ComponentKind.AGENT:
            try:
                self.inventory.machine(name)
            except NotFound:
                self.inventory.add_machine(
                    name,
                    str(facts.get("hostname") or name),
                    agent={k: v for k, v in facts.items() if k != "disks"},
                    now=now,
                )
            report = AgentReport.parse({"disks": facts.get("disks", []), "facts": {}})
            self.inventory.set_disks(name, [_disk_row(d) for d in report.disks])
            machine = self.inventory.machine(name)
            if self.settings.auto_protect and not machine["protection_enabled"]:
                with contextlib.suppress(ConfigServerError):
                    self.engine.submit(JobKind.PROTECT, name, {})
            self.inventory.add_event("info", name, "enrolled", f"agent {name} enrolled", now)
            return {"machine": name, "report_interval": self.settings.report_interval}
        if kind in (ComponentKind.PROCESS, ComponentKind.TARGET):
            address = facts.get("address")
            if not isinstance(address, str) or ":" not in address:
                raise InvalidArgument("a server enrols with facts.address = 'host:port'")
            role = ServerRole.PROCESS if kind is ComponentKind.PROCESS else ServerRole.TARGET
            target = facts.get("target") if role is ServerRole.PROCESS else None
            self.inventory.upsert_server(
                name,
                role.value,
                address,
                target=target if isinstance(target, str) else None,
                now=now,
            )
            self.inventory.add_event(
                "info", name, "enrolled", f"{role} server {name} enrolled", now
            )
            return {"role": role.value, "report_interval": self.settings.report_interval}
        self.inventory.add_event("info", name, "enrolled", f"{kind} {name} enrolled", now)
        return {}

    def report(self, name: str, kind: ComponentKind, params: dict[str, Any]) -> Record:
        """A component's periodic report; the answer tells it what to do."""
        now = self._clock()
        if kind is ComponentKind.AGENT:
            return self._agent_report(name, AgentReport.parse(params), now)
        if kind is ComponentKind.PROCESS:
            return self._process_report(name, params, now)
        if kind is ComponentKind.TARGET:
            return self._target_report(name, params, now)
        raise NotAuthorised(f"a {kind} certificate does not report")

    def _agent_report(self, name: str, report: AgentReport, now: float) -> Record:
        try:
            machine = self.inventory.machine(name)
        except NotFound:
            raise NotAuthorised(f"{name} is not an enrolled machine") from None
        reported = frozenset(d.disk_id for d in report.disks)
        if reported and reported != self._disk_ids.get(name):
            known = frozenset(d["disk_id"] for d in self.inventory.disks(name))
            if reported != known:
                self.inventory.set_disks(name, [_disk_row(d) for d in report.disks])
            self._disk_ids[name] = reported
        for d in report.disks:
            self._buffer.disk(
                name, d.disk_id, initial_percent=d.initial_percent, initial_done=d.initial_done
            )
        self._buffer.machine(
            name, last_seen=now, replicating=report.replicating, resync_done=report.resync_done
        )
        moved: dict[str, Any] = {}
        if report.failback_done > int(machine["failback_done"]):  # never backwards
            moved["failback_done"] = report.failback_done
        if report.failback and report.failback != machine["failback_result"]:
            moved["failback_result"] = report.failback
        self._buffer.machine(name, **moved)
        if (
            moved
            or report.replicating != bool(machine["replicating"])
            or report.resync_done != int(machine["resync_done"])
        ):
            self.flush()  # a job waits for exactly this
            self.engine.poke(name)
        return self._agent_answer(machine)

    def _agent_answer(self, machine: Record) -> Record:
        policy = self.inventory.policy(machine["policy"])
        answer: Record = {
            "protect": bool(machine["protection_enabled"]),
            "resync_generation": int(machine["resync_requested"]),
            "report_interval": self.settings.report_interval,
            "policy": {
                k: policy[k]
                for k in ("crash_interval_s", "app_interval_s", "pre_script", "post_script")
            },
        }
        if machine["process_server"]:
            server = self.inventory.server(machine["process_server"])
            answer["process_server"] = server["address"]
        if machine["failback_requested"] > machine["failback_done"] and machine["master_target"]:
            # Only while the failback job runs: a request it left behind when it failed
            # must not start a transfer later (the agent forgets what it tried).
            job = self.inventory.active_job_for(machine["name"])
            if job is not None and job["kind"] == JobKind.FAILBACK:
                target = self.inventory.server(machine["master_target"])["address"]
                answer["failback"] = {
                    "generation": int(machine["failback_requested"]),
                    "target": target,
                }
        if (group := self.group_answer(machine)) is not None:
            answer["group"] = group
        return answer

    def _process_report(self, name: str, params: dict[str, Any], now: float) -> Record:
        self._known_server(name, ServerRole.PROCESS)
        disks = parse_process_disks(params)
        for d in disks:
            self._buffer.disk(
                d["machine"],
                d["disk_id"],
                backlog_bytes=d["backlog_bytes"],
                rate_in=d["rate_in"],
                rate_out=d["rate_out"],
            )
        stats: Record = {
            k: params[k] for k in ("spool_bytes", "connections", "health", "target") if k in params
        }
        stats["backlog_bytes"] = sum(d["backlog_bytes"] for d in disks)
        self._server_seen(name, params, stats, now)
        return self._server_answer()

    def _target_report(self, name: str, params: dict[str, Any], now: float) -> Record:
        self._known_server(name, ServerRole.TARGET)
        points = parse_target_points(params)
        newer = []
        for machine, p in points.items():
            if self._newest.get(machine) != p.time:
                self._newest[machine] = p.time
                newer.append(machine)
            self._buffer.machine(
                machine,
                newest_point_time=p.time,
                newest_point_tag=p.tag_id,
                newest_point_kind=p.kind,
                newest_app_point_time=p.newest_app_time,
            )
        stats: Record = {k: params[k] for k in ("connections", "disks") if k in params}
        self._server_seen(name, params, stats, now)
        if newer:
            self.flush()  # a protect job may wait for this first point
            for machine in newer:
                self.engine.poke(machine)
        return self._server_answer()

    def _known_server(self, name: str, role: ServerRole) -> None:
        try:
            server = self.inventory.server(name)
        except NotFound:
            raise NotAuthorised(f"{name} is not an enrolled {role} server") from None
        if server["role"] != role.value:
            raise NotAuthorised(f"{name} is a {server['role']} server, not {role}")

    def _server_seen(self, name: str, params: dict[str, Any], stats: Record, now: float) -> None:
        def size(key: str) -> int | None:
            value = params.get(key)
            return int(value) if isinstance(value, int) and value >= 0 else None

        self.inventory.record_server_report(
            name,
            last_seen=now,
            stats=stats,
            capacity_bytes=size("capacity_bytes"),
            free_bytes=size("free_bytes"),
        )

    def _server_answer(self) -> Record:
        return {
            "revoked": self.inventory.revoked_serials(),
            "report_interval": self.settings.report_interval,
        }

    def check_certificate(self, serial: str) -> ComponentKind:
        """The kind of an enrolled, unrevoked certificate; NotAuthorised otherwise."""
        try:
            cert = self.inventory.certificate(serial)
        except NotFound:
            raise NotAuthorised(f"certificate {serial} was not issued here") from None
        if cert["revoked_at"] is not None:
            raise NotAuthorised(f"certificate {serial} of {cert['name']} is revoked")
        return ComponentKind(cert["kind"])

    # -- placement (protection.Placement) ------------------------------------------

    def _least_loaded_process(self, load: dict[str, int]) -> Record:
        processes = self.inventory.servers(ServerRole.PROCESS.value)
        if not processes:
            raise JobFailed("no process server is enrolled; enrol one first")
        return min(processes, key=lambda s: (load.get(s["name"], 0), s["name"]))

    def place(self, machine: Record) -> tuple[str, str]:
        load = self.inventory.machine_load()
        targets = self.inventory.servers(ServerRole.TARGET.value)
        process = self._least_loaded_process(load)
        if not targets:
            raise JobFailed("no master target is enrolled; enrol one first")
        by_address = {t["address"]: t["name"] for t in targets}
        target = by_address.get(process.get("target") or "")
        if target is None:  # the process server forwards to a target we do not know
            target = min(targets, key=lambda s: (load.get(s["name"], 0), s["name"]))["name"]
        return process["name"], target

    def _push_place(self) -> tuple[str, str]:
        process = self._least_loaded_process(self.inventory.machine_load())
        return process["name"], process["address"]

    def _take_push_key(self, job: str) -> str | None:
        return self._push_keys.pop(job, None)

    def _push_passphrase(self) -> str:
        current = self.passphrases.current(self._clock())
        current.require_valid(self._clock())
        return current.value

    def agent_alive(self, machine: str) -> bool:
        last = self.inventory.machine(machine)["last_seen"]
        return last is not None and self._clock() - last <= self.settings.health.agent_timeout

    # -- flush and health ----------------------------------------------------------

    def flush(self) -> None:
        machines, disks = self._buffer.take()
        if disks:  # rows of disks that went meanwhile are skipped by the inventory
            self.inventory.update_disks_bulk([(m, d, f) for (m, d), f in disks.items()])
        if machines:
            self.inventory.update_machines_bulk(list(machines.items()))

    def monitor(self) -> None:
        """Recompute every machine's state and the alerts."""
        now = self._clock()
        policies = {p["name"]: p for p in self.inventory.policies()}
        disks_of: dict[str, list[Record]] = {}
        for d in self.inventory.all_disks():
            disks_of.setdefault(d["machine"], []).append(d)
        for machine in self.inventory.machines():
            name = machine["name"]
            threshold = float(policies[machine["policy"]]["rpo_threshold_s"])
            state = health.machine_state(
                machine, disks_of.get(name, []), threshold, now, self.settings.health
            )
            if state != machine["state"] and self.inventory.set_machine_state(name, state, now):
                self._emit(MachineStateChanged(name, state.value))
                self.inventory.add_event("info", name, "state", f"{name} is {state}", now)
            for alerting in health.assess(machine, state, threshold, now):
                self._apply_alert(name, alerting, now)
        for server in self.inventory.servers():
            self._apply_alert(
                server["name"], health.server_alert(server, now, self.settings.health), now
            )

    def _apply_alert(self, subject: str, alerting: health.Alerting, now: float) -> None:
        key = (subject, alerting.kind.value)
        if alerting.active is None or alerting.active == (key in self._open_alerts):
            return  # nothing changes (an open alert keeps the message it was raised with)
        if alerting.active:
            self._open_alerts.add(key)
            record = self.inventory.raise_alert(
                subject, alerting.kind.value, alerting.severity.value, alerting.message, now
            )
        else:
            self._open_alerts.discard(key)
            record = self.inventory.clear_alert(subject, alerting.kind.value, now)
        if record is None:
            return
        self.inventory.add_event(
            alerting.severity.value if alerting.active else "info",
            subject,
            alerting.kind.value,
            alerting.message,
            now,
        )
        self._emit(
            AlertChanged(
                str(record["id"]), subject, alerting.kind.value, alerting.active, alerting.message
            )
        )

    # -- ConfigApi -----------------------------------------------------------------

    def _machine_record(self, m: Record, policy: Record, disks: list[Record], now: float) -> Record:
        rec = dict(m)
        rec.pop("agent", None)
        rec["rpo_seconds"] = health.rpo_seconds(now, m["newest_point_time"])
        rec["rpo_threshold_s"] = policy["rpo_threshold_s"]
        if disks:
            rec["initial_percent"] = round(
                sum(float(d["initial_percent"]) for d in disks) / len(disks), 1
            )
            rec["backlog_bytes"] = sum(int(d["backlog_bytes"]) for d in disks)
        rec["disks"] = len(disks)
        return rec

    async def machines(self) -> list[Record]:
        now = self._clock()
        policies = {p["name"]: p for p in self.inventory.policies()}
        disks_of: dict[str, list[Record]] = {}
        for d in self.inventory.all_disks():
            disks_of.setdefault(d["machine"], []).append(d)
        return [
            self._machine_record(m, policies[m["policy"]], disks_of.get(m["name"], []), now)
            for m in self.inventory.machines()
        ]

    async def machine(self, machine: str) -> Record:
        m = self.inventory.machine(_name(machine, "machine"))
        rec = self._machine_record(
            m, self.inventory.policy(m["policy"]), self.inventory.disks(machine), self._clock()
        )
        rec["agent"] = m.get("agent") or {}
        return rec

    async def disks(self, machine: str) -> list[Record]:
        self.inventory.machine(_name(machine, "machine"))
        return self.inventory.disks(machine)

    async def points(self, machine: str) -> list[Record]:
        m = self.inventory.machine(_name(machine, "machine"))
        if not m["master_target"]:
            return []
        if self._target_call is None:
            raise ConfigServerError("no way to reach master targets is configured")
        address = self.inventory.server(m["master_target"])["address"]
        try:
            points = await self._target_call(address, "points", {"machine_id": machine})
        except (OSError, TimeoutError) as exc:
            raise ConfigServerError(
                f"master target {m['master_target']} ({address}) is unreachable: {exc}"
            ) from None
        return [
            {
                "tag": p["tag_id"],
                "time": p["time_ns"] / 1e9,
                "kind": p["kind"],
                "usable": bool(p["usable"]),
                "disks": len(p["disks"]),
            }
            for p in points
        ]

    async def servers(self) -> list[Record]:
        load = self.inventory.machine_load()
        now = self._clock()
        out = []
        for s in self.inventory.servers():
            rec = dict(s)
            stats = rec.pop("stats", None) or {}
            rec["machines"] = load.get(s["name"], 0)
            rec["backlog_bytes"] = stats.get("backlog_bytes")
            last = s["last_seen"]
            rec["connected"] = last is not None and (
                now - last <= self.settings.health.server_timeout
            )
            out.append(rec)
        return out

    async def jobs(self, include_finished: bool) -> list[Record]:
        return self.inventory.jobs(include_finished)

    async def job(self, job: str) -> Record:
        return self.inventory.job(_name(job, "job"))

    async def alerts(self, include_cleared: bool) -> list[Record]:
        return self.inventory.alerts(include_cleared)

    async def events(self, limit: int) -> list[Record]:
        if not 0 < limit <= 10_000:
            raise InvalidArgument("limit must be between 1 and 10000")
        return self.inventory.events(limit)

    async def policies(self) -> list[Record]:
        return self.inventory.policies()

    async def set_policy(self, name: str, settings: Record) -> Record:
        return self.inventory.set_policy(_name(name, "policy"), **settings)

    async def assign_policy(self, machine: str, policy: str) -> None:
        self.inventory.policy(_name(policy, "policy"))
        self.inventory.machine(_name(machine, "machine"))
        self.inventory.update_machine(machine, policy=policy)

    async def protect(self, machine: str, policy: str | None) -> str:
        self.inventory.machine(_name(machine, "machine"))
        if policy:
            self.inventory.policy(_name(policy, "policy"))
        return self.engine.submit(JobKind.PROTECT, machine, {"policy": policy or None})

    async def unprotect(self, machine: str) -> str:
        self.inventory.machine(_name(machine, "machine"))
        return self.engine.submit(JobKind.UNPROTECT, machine, {})

    async def resync(self, machine: str) -> str:
        m = self.inventory.machine(_name(machine, "machine"))
        if not m["protection_enabled"]:
            raise InvalidArgument(f"{machine} is not protected; protect it first")
        return self.engine.submit(JobKind.RESYNC, machine, {})

    async def passphrase(self, rotate: bool) -> Record:
        now = self._clock()
        if rotate:
            record = self.passphrases.rotate(now, None).record()
            self.inventory.add_event("info", "configd", "passphrase", "passphrase rotated", now)
            return record
        return self.passphrases.current(now).record()

    async def revoke(self, name: str) -> None:
        serials = self.inventory.revoke(_name(name), self._clock())
        self.inventory.add_event(
            "warning",
            name,
            "revoked",
            f"{len(serials)} certificates of {name} revoked",
            self._clock(),
        )
        log.warning("revoked %s: serials %s", name, ", ".join(serials))
        if self.on_revoke is not None:
            self.on_revoke(set(self.inventory.revoked_serials()))

    async def status(self) -> Record:
        machines = await self.machines()
        by_state: dict[str, int] = {}
        for m in machines:
            by_state[m["state"]] = by_state.get(m["state"], 0) + 1
        alerts = self.inventory.alerts(False)
        return {
            "version": __version__,
            "machines": {"total": len(machines), "by_state": by_state},
            "worst_rpo_seconds": self._worst_rpo(machines),
            "open_alerts": len(alerts),
            "alerts": alerts,
            "servers": await self.servers(),
            "groups": self.group_status(),
            "jobs": [
                j
                for j in self.inventory.jobs(False)
                if j["state"] in (JobState.QUEUED, JobState.RUNNING)
            ],
        }

    @staticmethod
    def _worst_rpo(machines: list[Record]) -> float:
        rpos = [
            m["rpo_seconds"]
            for m in machines
            if m["protection_enabled"] and m["rpo_seconds"] is not None
        ]
        return round(max(rpos), 1) if rpos else -1.0

    def summary(self) -> Summary:
        counts = self.inventory.counts()
        now = self._clock()
        rpos = [
            now - m["newest_point_time"]
            for m in self.inventory.machines()
            if m["protection_enabled"] and m["newest_point_time"] is not None
        ]
        return Summary(
            version=__version__,
            machines=counts["machines"],
            protected_machines=counts["by_state"].get(MachineState.PROTECTED.value, 0),
            open_alerts=self.inventory.open_alerts_count(),
            running_jobs=self.engine.running,
            worst_rpo_seconds=round(max(rpos), 1) if rpos else -1.0,
        )


def _disk_row(d: Any) -> Record:
    return {
        "disk_id": d.disk_id,
        "path": d.path,
        "size_bytes": d.size_bytes,
        "sector_size": d.sector_size,
    }
