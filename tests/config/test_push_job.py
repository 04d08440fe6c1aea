"""The push-install and push-uninstall jobs against a fake process-server RPC:
placement, the request they send, the engine's steps shown as the job's detail, the
refusals turned into operator messages, the credentials never stored; uninstall
revokes and forgets the machine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config.errors import ConfigServerError, InvalidArgument, NotFound
from appliance.config.inventory import Inventory
from appliance.config.model import ComponentKind
from appliance.config.passphrase import PassphraseStore
from appliance.config.service import ConfigService, ServiceSettings
from appliance.config.targets import RemoteRefused

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n-----END OPENSSH PRIVATE KEY-----\n"


class FakeProcess:
    """The process servers' push RPCs: answer, or refuse, as told; push_status tells
    the steps of the run so far."""

    def __init__(self, service: ConfigService) -> None:
        self.service = service
        self.calls: list[tuple[str, str, dict[str, Any], float]] = []
        self.refuse: dict[str, Any] | None = None
        self.steps: dict[str, list[dict[str, str]]] = {}

    async def __call__(self, address: str, method: str, params: dict[str, Any],
                       timeout: float) -> Any:  # fmt: skip
        if method == "push_status":
            return {"run": params["run"], "steps": self.steps.get(params["run"], [])}
        self.calls.append((address, method, params, timeout))
        self.steps[params["run"]] = [{"step": "probe", "message": "Debian 12"},
                                     {"step": "copy", "message": "bundle copied"}]  # fmt: skip
        if self.refuse is not None:
            raise RemoteRefused(f"{address}: {method} failed", self.refuse)
        if method == "push_uninstall":
            return {"host": params["host"], "action": "uninstalled", "machine": "db1"}
        self.service.register(params["machine_id"], ComponentKind.AGENT, {"disks": []})
        return {"host": params["host"], "action": "installed", "enrolled": True}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[ConfigService, FakeProcess, Path]]:
    db = tmp_path / "inv.db"
    inv = Inventory.open(db)
    settings = ServiceSettings(job_poll=0.02, auto_protect=False, address="cs.example:9440")
    fake: FakeProcess | None = None

    async def call(address: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        assert fake is not None
        return await fake(address, method, params, timeout)

    service = ConfigService(inv, PassphraseStore(tmp_path / "pp.json"), settings,
                            push_call=call)  # fmt: skip
    fake = FakeProcess(service)
    service.register("p1", ComponentKind.PROCESS, {"address": "10.0.0.5:9441"})
    yield service, fake, db
    inv.close()


async def finished(service: ConfigService, job_id: str) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while (job := await service.job(job_id))["state"] not in ("succeeded", "failed"):
            await asyncio.sleep(0.02)
    return job


def test_push_install_job_succeeds_without_storing_the_key(
    env: tuple[ConfigService, FakeProcess, Path],
) -> None:
    service, fake, db = env

    async def scenario() -> dict[str, Any]:
        job_id = await service.push_install(
            "10.0.0.7", {"key": KEY, "disks": ["/dev/sdb"], "machine": "db1", "port": 2222}
        )
        return await finished(service, job_id)

    job = asyncio.run(scenario())
    assert job["state"] == "succeeded", job
    assert job["subject"] == "push:10.0.0.7"
    assert job["result"]["process_server"] == "p1"
    assert job["result"]["report"]["action"] == "installed"
    assert job["result"]["detail"] == "copy: bundle copied"
    assert job["result"]["steps"] == ["probe: Debian 12", "copy: bundle copied"]
    ((address, method, params, timeout),) = fake.calls
    assert (address, method, timeout) == ("10.0.0.5:9441", "push_install", 600.0)
    assert params["key"] == KEY and params["port"] == 2222 and params["machine_id"] == "db1"
    assert params["server"] == "cs.example:9440" and params["disks"] == ["/dev/sdb"]
    assert params["passphrase"] == service.passphrases.current(0).value
    assert params["run"] == job["id"] and "password" not in params
    assert "key" not in job["params"]
    for path in db.parent.glob("inv.db*"):  # the database and its WAL
        assert b"PRIVATE KEY" not in path.read_bytes()


def test_unknown_host_key_fails_with_the_fingerprint(
    env: tuple[ConfigService, FakeProcess, Path],
) -> None:
    service, fake, _db = env
    fake.refuse = {"error": "UnknownHostKey", "message": "first connection",
                   "fingerprint": "SHA256:abc"}  # fmt: skip

    async def scenario() -> dict[str, Any]:
        job_id = await service.push_install("h1", {"key": KEY, "disks": ["/dev/sdb"]})
        return await finished(service, job_id)

    job = asyncio.run(scenario())
    assert job["state"] == "failed" and job["step"] == "install"
    assert "--accept-fingerprint SHA256:abc" in job["error"]
    fake.refuse = {"error": "NoRoot", "message": "h1: not root", "hint": "use sudo"}
    job = asyncio.run(scenario())
    assert job["error"] == "NoRoot: h1: not root (use sudo)"


def test_options_are_checked(env: tuple[ConfigService, FakeProcess, Path]) -> None:
    service, _fake, _db = env

    async def push(options: dict[str, Any]) -> str:
        return await service.push_install("h1", options)

    for options, message in (
        ({"disks": ["/dev/sdb"]}, "either option key or option password"),
        ({"key": KEY, "password": "pw", "disks": ["/dev/sdb"]}, "either option key"),
        ({"key": KEY}, "disks is required"),
        ({"key": KEY, "disks": ["sdb"]}, "device paths"),
        ({"key": KEY, "disks": ["/dev/sdb"], "port": "22"}, "port must be int"),
        ({"key": KEY, "disks": ["/dev/sdb"], "sudo": "x"}, "unknown options: sudo"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            asyncio.run(push(options))


def test_not_configured(tmp_path: Path) -> None:
    inv = Inventory.open(tmp_path / "inv.db")
    service = ConfigService(inv, PassphraseStore(tmp_path / "pp.json"))
    with pytest.raises(ConfigServerError, match="not configured"):
        asyncio.run(service.push_install("h1", {"key": KEY, "disks": ["/dev/sdb"]}))
    inv.close()


def test_password_is_sent_never_stored(env: tuple[ConfigService, FakeProcess, Path]) -> None:
    service, fake, db = env

    async def scenario() -> dict[str, Any]:
        options = {"password": "pw-secret-1", "user": "admin", "disks": ["/dev/sdb"]}
        return await finished(service, await service.push_install("h1", options))

    job = asyncio.run(scenario())
    assert job["state"] == "succeeded", job
    ((_address, _method, params, _timeout),) = fake.calls
    assert params["password"] == "pw-secret-1" and "key" not in params
    assert params["user"] == "admin"
    assert "password" not in job["params"]
    for path in db.parent.glob("inv.db*"):
        assert b"pw-secret-1" not in path.read_bytes()


def test_push_uninstall_revokes_and_forgets_the_machine(
    env: tuple[ConfigService, FakeProcess, Path],
) -> None:
    service, fake, _db = env
    service.register("db1", ComponentKind.AGENT, {"disks": []})
    service.inventory.add_certificate("ab12", "db1", ComponentKind.AGENT.value, 1.0, 2.0)
    service.inventory.update_machine("db1", process_server="p1")

    async def scenario() -> dict[str, Any]:
        job_id = await service.push_uninstall("10.0.0.7", {"key": KEY, "machine": "db1"})
        return await finished(service, job_id)

    job = asyncio.run(scenario())
    assert job["state"] == "succeeded", job
    assert job["kind"] == "push-uninstall" and job["result"]["machine"] == "db1"
    ((address, method, params, _timeout),) = fake.calls
    assert (address, method, params["key"]) == ("10.0.0.5:9441", "push_uninstall", KEY)
    assert service.inventory.revoked_serials() == ["ab12"]
    with pytest.raises(NotFound):
        service.inventory.machine("db1")
    with pytest.raises(InvalidArgument, match="unknown options: disks"):
        asyncio.run(service.push_uninstall("h", {"key": KEY, "disks": []}))
