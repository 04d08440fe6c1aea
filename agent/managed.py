"""`secondsite-agent run` on an enrolled host: the configuration server decides.

The agent reports its disks and progress to the configuration server it enrolled
with; each answer says whether to protect, through which process server, and which
resync generation is wanted. A `Session` (sender + replicator) exists only while
protection is on; moving to another process server stops one and starts the next,
and the replication state on disk carries the progress across (nothing is re-copied).

An answer may also ask for a failback (`{"failback": {"generation": n, "target":
"host:port"}}`, only while protection is off): replication stays stopped, the disks
are made equal to their replicas (`agent.failback`) in a background task, and the
reports carry `failback_done` (the newest generation finished), its figures, or the
error that stopped it — the configuration server's job waits for these.

An answer's `{"group": {...}}` (the machine is in a consistency group) starts the
`agent.group_tag.GroupTagger`: the group's common points, taken by the session's
replicator with a barrier at the configuration server inside the freeze.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import failback
from agent.config import AgentConfig
from agent.discovery import Disk, disk_identity, refresh
from agent.disk_ids import assign as assign_disk_ids
from agent.errors import AgentError
from agent.group_tag import BarrierClient, GroupTagger
from agent.remote import stream_digests
from agent.replicator import AckRelay, Replicator
from agent.state import load as load_state
from agent.trackers.base import Tracker
from appliance.daemon.enrolled import load as load_enrolment
from appliance.settings import host_port, parse_host_port
from appliance.wire.errors import WireError
from appliance.wire.sender import StreamSender

log = logging.getLogger("secondsite.agent")

TrackerFactory = Callable[[Disk], Tracker]


@dataclass
class Session:
    address: str
    sender: StreamSender
    replicator: Replicator


class Controller:
    def __init__(
        self,
        config: AgentConfig,
        disks: list[Disk],
        factory: TrackerFactory,
        ssl_context: ssl.SSLContext,
        tls_names: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.disks = disks
        self.session: Session | None = None
        self.failed: BaseException | None = None
        self._factory = factory
        self._ssl = ssl_context
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self.failback_done = 0
        self.failback_report: dict[str, Any] = {}  # the last failback's figures or error
        self._failback: asyncio.Task[None] | None = None
        self._policy: dict[str, Any] = {}
        self.groups: GroupTagger | None = None  # made on the first answer naming a group
        self._disk_ids: dict[str, str] | None = None  # kernel name -> disk id

    def disk_id(self, disk: Disk) -> str:
        """Bound to the disk's identity, not its kernel name (`agent.disk_ids`)."""
        if self._disk_ids is None:
            self._disk_ids = assign_disk_ids(self.config.state_dir, self.config.machine_id,
                                             self.disks)  # fmt: skip
        return self._disk_ids[disk.name]

    # -- the report ------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        rep = self.session.replicator if self.session else None
        progress = rep.progress if rep else {}
        disks = []
        for disk in self.disks:
            disk_id = self.disk_id(disk)
            p = progress.get(disk_id)
            if p is not None:
                percent, done = p.percent, p.done
            else:  # not replicating now: what the saved state says
                state = load_state(self.config.state_dir, disk_id, disk.size, disk_identity(disk))
                percent, done = state.initial_percent, state.initial_done
            disks.append(
                {
                    "disk_id": disk_id,
                    "path": str(disk.path),
                    "size_bytes": disk.size,
                    "sector_size": disk.logical_sector_size,
                    "initial_percent": round(percent, 2),
                    "initial_done": done,
                }
            )
        return {
            "disks": disks,
            "replicating": rep is not None and rep.phase not in ("failed", "stopped"),
            "resync_done": rep.resync_done if rep else 0,
            "failback_done": self.failback_done,
            "failback": self.failback_report,
            "facts": {"hostname": socket.gethostname(), "phase": rep.phase if rep else "idle"},
        }

    # -- the answer ----------------------------------------------------------------

    async def apply(self, answer: dict[str, Any]) -> None:
        async with self._lock:
            address = answer.get("process_server")
            protect = bool(answer.get("protect")) and isinstance(address, str)
            if protect and host_port(str(address)) is not None:
                log.warning("ignoring a malformed process server address %r", address)
                protect = False
            if self.session is not None and (not protect or self.session.address != address):
                await self._stop()
            failing_back = self._failback is not None and not self._failback.done()
            if protect and self.session is None and not failing_back:
                await self._start(str(address))
            elif not protect:
                self._maybe_fail_back(answer.get("failback"))
            generation = answer.get("resync_generation")
            if self.session is not None and isinstance(generation, int) and generation > 0:
                self.session.replicator.request_resync(generation)
            self._apply_policy(answer.get("policy"))
            self._apply_group(answer.get("group"))

    def _apply_group(self, group: Any) -> None:
        """Take this machine's consistency-group points (`agent.group_tag`)."""
        if self.groups is None and isinstance(group, dict):
            enrolled = load_enrolment(self.config.state_dir)
            if enrolled is None:
                return
            host, port = enrolled.address
            client = BarrierClient(host, port, self._ssl, self.config.machine_id)
            self.groups = GroupTagger(
                client, lambda: self.session.replicator if self.session else None
            )
        if self.groups is not None:
            self.groups.update(group)

    def _apply_policy(self, policy: Any) -> None:
        """The machine's policy (intervals, scripts) from the configuration server; the
        local configuration's values stand until one arrives, and for what it omits."""
        if not isinstance(policy, dict) or policy == self._policy:
            return
        self._policy = policy
        schedule = self._schedule()
        if self.session is not None:
            self.session.replicator.set_schedule(*schedule)
        log.info("policy: tags every %.0f s, app-consistent every %s", schedule[0],
                 f"{schedule[1]:.0f} s" if schedule[1] else "never")  # fmt: skip

    def _schedule(self) -> tuple[float, float | None, tuple[str, ...], tuple[str, ...]]:
        p, c = self._policy, self.config

        def number(key: str, default: float | None) -> float | None:
            value = p.get(key)
            return float(value) if isinstance(value, int | float) and value > 0 else default

        def script(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = p.get(key)
            return tuple(shlex.split(value)) if isinstance(value, str) and value else default

        return (
            number("crash_interval_s", c.tag_interval) or c.tag_interval,
            number("app_interval_s", c.app_interval),
            script("pre_script", c.pre_script),
            script("post_script", c.post_script),
        )

    async def close(self) -> None:
        async with self._lock:
            if self.groups is not None:
                await self.groups.close()
            await self._stop()
            if self._failback is not None:
                self._failback.cancel()
                await asyncio.gather(self._failback, return_exceptions=True)

    def _maybe_fail_back(self, request: Any) -> None:
        """Start the failback an answer asks for, once per generation (a failed one is
        reported; the configuration server asks again with a new generation)."""
        running = self._failback is not None and not self._failback.done()
        if running or not isinstance(request, dict):
            return
        generation, address = request.get("generation"), request.get("target")
        tried = self.failback_report.get("generation", 0)
        if not isinstance(generation, int) or generation <= max(self.failback_done, tried):
            return
        if not isinstance(address, str) or host_port(address) is not None:
            log.warning("ignoring a failback from a malformed address %r", address)
            return
        self.failback_report = {"generation": generation, "running": True}
        self._failback = asyncio.create_task(self._fail_back(generation, address))

    async def _fail_back(self, generation: int, address: str) -> None:
        disks = [(d, self.disk_id(d)) for d in self.disks]
        log.info("failback %d: from the master target %s", generation, address)
        try:
            result = await failback.run(address, self._ssl, self.config.machine_id, disks)
            # The disks were unmounted for it: the next session must not freeze the
            # mount points of startup (that would freeze whatever holds them now).
            self.disks = await asyncio.to_thread(lambda: [refresh(d) for d in self.disks])
        except (AgentError, WireError, OSError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, AgentError) else str(exc)
            log.error("failback %d failed: %s", generation, message)
            self.failback_report = {"generation": generation, "error": message}
            return
        log.info("failback %d done: %d bytes received, %d written in %.1f s", generation,
                 result.bytes_received, result.bytes_written, result.seconds)  # fmt: skip
        self.failback_report = {"generation": generation, **result.as_dict()}
        self.failback_done = generation

    async def _start(self, address: str) -> None:
        host, port = parse_host_port(address)
        acks = AckRelay()
        sender = StreamSender(
            host,
            port,
            self._ssl,
            name=self.config.machine_id,
            role="agent",
            server_hostname=self.config.tls_name or host,
            on_ack=acks,
        )
        tag_interval, app_interval, pre, post = self._schedule()
        rep = Replicator(
            self.disks,
            sender,
            self._factory,
            self.config.state_dir,
            machine_id=self.config.machine_id,
            acks=acks,
            tag_interval=tag_interval,
            app_interval=app_interval,
            pre_script=pre or None,
            post_script=post or None,
            freeze_timeout=self.config.freeze_timeout,
            remote_digests=stream_digests(sender, asyncio.get_running_loop()),
        )
        await sender.start()
        await rep.start()
        self.session = Session(address, sender, rep)
        self._watch = asyncio.create_task(self._watch_session(rep))
        log.info("protecting %s via %s", ", ".join(str(d.path) for d in self.disks), address)

    async def _watch_session(self, rep: Replicator) -> None:
        try:
            await rep.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, the daemon decides
            self.failed = exc

    async def _stop(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        if self._watch is not None:
            self._watch.cancel()
        log.info("stopping replication via %s", session.address)
        await session.replicator.stop()
        await session.sender.close()
