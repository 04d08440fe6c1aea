"""The configuration server's core, driven the way components drive it (register, report).

The inventory is a real SQLite file and the jobs really run; what the components
would send is fed to `register` / `report` directly (the wire path has its own
integration test).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.config.api import AlertChanged, MachineStateChanged, Signal
from appliance.config.errors import InvalidArgument, NotAuthorised, NotFound
from appliance.config.health import HealthSettings
from appliance.config.inventory import Inventory
from appliance.config.model import ComponentKind, MachineState
from appliance.config.passphrase import PassphraseStore
from appliance.config.service import ConfigService, ServiceSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


DISKS = [
    {"disk_id": "web1-sdb", "path": "/dev/sdb", "size_bytes": 1 << 30, "sector_size": 512},
    {"disk_id": "web1-sdc", "path": "/dev/sdc", "size_bytes": 1 << 29, "sector_size": 4096},
]


def agent_report(percent: float, done: bool, *, replicating: bool = True) -> dict[str, Any]:
    return {
        "disks": [d | {"initial_percent": percent, "initial_done": done} for d in DISKS],
        "replicating": replicating,
        "facts": {"hostname": "web1"},
    }


@pytest.fixture
def env(tmp_path: Path) -> Any:
    inv = Inventory.open(tmp_path / "inv.db")
    clock = Clock()
    settings = ServiceSettings(
        health=HealthSettings(agent_timeout=30, server_timeout=30), report_interval=1
    )
    service = ConfigService(inv, PassphraseStore(tmp_path / "pp.json"), settings, clock=clock)
    signals: list[Signal] = []
    service.subscribe(signals.append)
    yield service, inv, clock, signals
    inv.close()


async def settle(service: ConfigService, job_id: str, state: str, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while True:
            service.flush()
            if service.inventory.job(job_id)["state"] == state:
                return
            await asyncio.sleep(0.02)


def test_enrol_place_protect_and_rpo(env: Any) -> None:
    service, inv, clock, signals = env

    async def scenario() -> None:
        service.register("t1", ComponentKind.TARGET, {"address": "10.0.0.9:9442"})
        service.register(
            "p1", ComponentKind.PROCESS, {"address": "10.0.0.5:9441", "target": "10.0.0.9:9442"}
        )
        service.register("p2", ComponentKind.PROCESS, {"address": "10.0.0.6:9441"})
        service.register("web1", ComponentKind.AGENT, {"hostname": "web1", "disks": DISKS})
        (job,) = await service.jobs(False)
        assert job["kind"] == "protect" and job["subject"] == "web1"
        await asyncio.sleep(0.1)
        machine = inv.machine("web1")
        # p1 before p2 at equal load (by name); t1 because p1 forwards there
        assert (machine["process_server"], machine["master_target"]) == ("p1", "t1")
        answer = service.report(
            "web1", ComponentKind.AGENT, agent_report(0, False, replicating=False)
        )
        assert answer["protect"] is True and answer["process_server"] == "10.0.0.5:9441"
        service.report("web1", ComponentKind.AGENT, agent_report(40.0, False))
        await asyncio.sleep(0.1)
        service.flush()
        assert inv.job(job["id"])["step"] == "initial-sync"
        assert 40 < inv.job(job["id"])["percent"] < 100
        clock.now += 10  # the first point comes after the job started
        service.report("web1", ComponentKind.AGENT, agent_report(100.0, True))
        service.report(
            "t1",
            ComponentKind.TARGET,
            {"machines": {"web1": {"tag_id": "tag-1", "time": clock.now - 3, "kind": "crash"}}},
        )
        await settle(service, job["id"], "succeeded")
        service.monitor()
        (m,) = await service.machines()
        assert m["state"] == MachineState.PROTECTED
        assert m["rpo_seconds"] == pytest.approx(3.0)
        assert MachineStateChanged("web1", "protected") in signals
        status = await service.status()
        assert status["machines"]["by_state"]["protected"] == 1
        assert status["worst_rpo_seconds"] == pytest.approx(3.0)
        await service.engine.close()

    asyncio.run(scenario())


def test_rpo_alert_raised_and_cleared_with_hysteresis(env: Any) -> None:
    service, inv, clock, signals = env

    async def scenario() -> None:
        await service.set_policy("tight", {"rpo_threshold_s": 60})
        service.register("t1", ComponentKind.TARGET, {"address": "10.0.0.9:9442"})
        service.register("p1", ComponentKind.PROCESS, {"address": "10.0.0.5:9441"})
        service.register("web1", ComponentKind.AGENT, {"disks": DISKS})
        await service.assign_policy("web1", "tight")
        await asyncio.sleep(0.05)

        def tick(point_age: float) -> None:
            service.report("web1", ComponentKind.AGENT, agent_report(100, True))
            service.report(
                "t1",
                ComponentKind.TARGET,
                {
                    "machines": {
                        "web1": {"tag_id": "x", "time": clock.now - point_age, "kind": "crash"}
                    }
                },
            )
            service.flush()
            service.monitor()

        def open_rpo_alerts() -> int:
            return sum(1 for a in inv.alerts(False) if a["kind"] == "rpo-exceeded")

        tick(10)
        assert open_rpo_alerts() == 0
        tick(90)
        assert open_rpo_alerts() == 1
        assert inv.machine("web1")["state"] == "rpo-exceeded"
        tick(55)  # under the threshold, inside the band: the alert stays
        assert open_rpo_alerts() == 1
        tick(20)
        assert open_rpo_alerts() == 0
        changes = [s for s in signals if isinstance(s, AlertChanged) and s.kind == "rpo-exceeded"]
        assert [c.active for c in changes] == [True, False]
        await service.engine.close()

    asyncio.run(scenario())


def test_agent_silence_is_disconnected(env: Any) -> None:
    service, inv, clock, _ = env

    async def scenario() -> None:
        service.register("t1", ComponentKind.TARGET, {"address": "h:1"})
        service.register("p1", ComponentKind.PROCESS, {"address": "h:2"})
        service.register("web1", ComponentKind.AGENT, {"disks": DISKS})
        await asyncio.sleep(0.05)
        service.report("web1", ComponentKind.AGENT, agent_report(5, False))
        service.flush()
        service.monitor()
        assert inv.machine("web1")["state"] == "initial-sync"
        clock.now += 31
        service.monitor()
        assert inv.machine("web1")["state"] == "disconnected"
        assert {a["kind"] for a in inv.alerts(False)} >= {
            "agent-disconnected",
            "server-disconnected",
        }
        await service.engine.close()

    asyncio.run(scenario())


def test_reports_from_strangers_and_bad_reports_are_refused(env: Any) -> None:
    service, *_ = env
    with pytest.raises(NotAuthorised):
        service.report("ghost", ComponentKind.AGENT, agent_report(0, False))
    with pytest.raises(NotAuthorised):
        service.report("ghost", ComponentKind.PROCESS, {})
    service.register("p1", ComponentKind.PROCESS, {"address": "h:2"})
    with pytest.raises(NotAuthorised):  # a process server cannot report as a target
        service.report("p1", ComponentKind.TARGET, {})
    with pytest.raises(InvalidArgument):
        service.report("p1", ComponentKind.PROCESS, {"disks": [{"machine_id": 5}]})
    with pytest.raises(InvalidArgument):
        service.register("p2", ComponentKind.PROCESS, {"address": "no-port"})


def test_api_refusals(env: Any) -> None:
    service, *_ = env

    async def scenario() -> None:
        with pytest.raises(NotFound):
            await service.machine("nope")
        with pytest.raises(NotFound):
            await service.protect("nope", None)
        with pytest.raises(InvalidArgument):
            await service.events(0)
        with pytest.raises(InvalidArgument):
            await service.machine("x" * 300)
        with pytest.raises(NotFound):
            await service.revoke("nobody")
        record = await service.passphrase(False)
        rotated = await service.passphrase(True)
        assert record["passphrase"] != rotated["passphrase"]

    asyncio.run(scenario())


def test_resync_job_asks_the_agent_and_waits_for_its_answer(env: Any) -> None:
    service, inv, clock, _ = env

    async def scenario() -> None:
        service.register("t1", ComponentKind.TARGET, {"address": "h:1"})
        service.register("p1", ComponentKind.PROCESS, {"address": "h:2"})
        service.register("web1", ComponentKind.AGENT, {"disks": DISKS})
        await asyncio.sleep(0.05)
        report = agent_report(100, True)
        service.report("web1", ComponentKind.AGENT, report)
        clock.now += 5
        point = {"tag_id": "t", "time": clock.now, "kind": "crash"}
        service.report("t1", ComponentKind.TARGET, {"machines": {"web1": point}})
        (protect,) = await service.jobs(False)
        await settle(service, protect["id"], "succeeded")
        job_id = await service.resync("web1")
        async with asyncio.timeout(5):
            while service.report("web1", ComponentKind.AGENT, report)["resync_generation"] < 1:
                await asyncio.sleep(0.02)
        assert inv.job(job_id)["state"] == "running"
        service.report("web1", ComponentKind.AGENT, report | {"resync_done": 1})
        await settle(service, job_id, "succeeded")
        # a second resync asks for the next generation, not the same one again
        second = await service.resync("web1")
        async with asyncio.timeout(5):
            while (
                service.report("web1", ComponentKind.AGENT, report | {"resync_done": 1})[
                    "resync_generation"
                ]
                < 2
            ):
                await asyncio.sleep(0.02)
        assert inv.job(second)["params"]["generation"] == 2
        await service.engine.close()

    asyncio.run(scenario())
