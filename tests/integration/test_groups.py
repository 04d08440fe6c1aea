"""Consistency groups with everything real: configd on a private bus, a master target and
a process server enrolled through it, and two agents (db1, app1), each on its own
mounted loop ext4 disk, that freeze, meet at configd's barrier and tag together.

- Both members carry the same group tag id; configd shows it as the common point.
- A stopped member makes the barrier miss: no group tag for that slot, an event names
  the missing member, and the other member thaws (its filesystem takes writes, and it
  keeps taking its own points).
- configd stopped and then killed while members wait at the barrier: the members thaw
  on their own bound, and group points resume once configd is back; a point asked for
  on demand (`group-tag`) is taken by both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.integration.configsite import Site, machine
from tests.loopfs import loop_ext4

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.slow]

INTERVAL = 5  # the shortest group interval configd accepts
MEMBERS = ("db1", "app1")


@pytest.fixture
def group_site(site: Site, tmp_path: Path) -> Iterator[tuple[Site, dict[str, Path]]]:
    """Both members protected and in group erp; yields their mountpoints."""
    site.servers(tmp_path / "datastore")
    with ExitStack() as stack:
        mounts = {}
        for name in MEMBERS:
            (tmp_path / name).mkdir()
            device, mnt = stack.enter_context(loop_ext4(tmp_path / name, 32))
            (mnt / "data.txt").write_text(f"{name} data\n" * 1000)
            os.sync()
            site.agent(device, name)
            mounts[name] = mnt
        for name in MEMBERS:
            site.wait(f"{name} protected",
                      lambda n=name: (m := machine(site, n)) and m["state"] == "protected")  # type: ignore[misc]  # fmt: skip
        made = site.ctl_json("group-set", "erp", "--add", "db1", "--add", "app1",
                             "--interval", f"{INTERVAL}s")  # fmt: skip
        assert made == {"name": "erp", "interval_s": INTERVAL, "members": ["app1", "db1"]}
        yield site, mounts


def group_tags(site: Site, name: str) -> set[str]:
    return {p["tag"] for p in site.ctl_json("points", name) if p["tag"].startswith("group:erp:")}


def common_point(site: Site) -> dict[str, Any] | None:
    (group,) = site.ctl_json("groups")
    point: dict[str, Any] | None = group.get("point")
    return point


def writable(mnt: Path) -> None:
    """A write and its flush complete: the filesystem is not frozen (a frozen one
    would block them, and the timeout would fail the test)."""
    subprocess.run(["sh", "-c", f"echo more >> {mnt}/data.txt && sync -f {mnt}/data.txt"],
                   check=True, timeout=30)  # fmt: skip


def test_members_share_a_group_tag_and_a_stopped_member_is_named(
    group_site: tuple[Site, dict[str, Path]],
) -> None:
    site, mounts = group_site
    first = site.wait("a common group point", lambda: common_point(site), timeout=120)
    assert first["tag"] == f"group:erp:{first['slot']}"
    assert first["slot"] % INTERVAL == 0
    for name in MEMBERS:  # the same tag id on both machines, usable on the target
        assert first["tag"] in group_tags(site, name)
    (status,) = site.ctl_json("status")["groups"]
    assert status["name"] == "erp" and status["last_barrier"]["ok"] is True
    for bad, needle in [
        (("--add", "ghost"), "no machine named 'ghost'"),
        (("--add", "db1", "--remove", "db1"), "both name db1"),
        (("--interval", "1s"), "5 to 86400"),
    ]:
        done = site.ctl("group-set", "erp", *bad, check=False)
        assert done.returncode != 0 and needle in done.stderr, done.stderr

    # app1's agent stops: db1 freezes at the next slots, waits its bound, thaws, no tag.
    app1 = next(p for p in site.agents if "agent-app1.toml" in str(p.args))
    app1.terminate()
    app1.wait(timeout=30)
    stopped_at = time.time()

    def missed() -> list[dict[str, Any]]:
        return [e for e in site.ctl_json("events", "-n", "200")
                if e["kind"] == "group-point-missed" and e["time"] > stopped_at]  # fmt: skip

    (event, *_) = site.wait("a missed group point", missed, timeout=60)
    assert event["subject"] == "erp" and "app1 did not arrive" in event["message"]
    slot = int(event["message"].split()[2])  # "group point SLOT of erp not taken: ..."
    assert f"group:erp:{slot}" not in group_tags(site, "db1")
    writable(mounts["db1"])
    # db1 still takes points: the missed round and those after it are its own.
    before = {p["tag"] for p in site.ctl_json("points", "db1")}
    site.wait("a new point of db1", lambda: {p["tag"] for p in site.ctl_json("points", "db1")}
              - before, timeout=60)  # fmt: skip
    assert common_point(site) is not None  # the earlier common point is still there
    log = (site.tmp / "agent-db1.log").read_text()
    assert f"no group point for slot {slot}" in log


def test_configd_gone_mid_barrier_thaws_the_members(
    group_site: tuple[Site, dict[str, Path]],
) -> None:
    site, mounts = group_site
    site.wait("a common group point", lambda: common_point(site), timeout=120)
    process = site.configd.process
    assert process is not None
    # Stop configd just before a slot: both members freeze at it and wait for an
    # answer that never comes; then it is killed outright and started again.
    now = time.time()
    slot = int((now // INTERVAL + 1) * INTERVAL)
    if slot - now < 1.0:
        slot += INTERVAL
    time.sleep(slot - time.time() - 0.5)
    os.kill(process.pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)  # past the slot and any freeze bound
        for name in MEMBERS:
            writable(mounts[name])
    finally:
        site.configd.kill()
    site.configd.start()
    for name in MEMBERS:
        log = (site.tmp / f"agent-{name}.log").read_text()
        assert f"no group point for slot {slot}" in log, log[-2000:]
    site.wait("a group point after configd's return",
              lambda: (p := common_point(site)) and p["slot"] > slot, timeout=120)  # fmt: skip
    for name in MEMBERS:
        assert f"group:erp:{slot}" not in group_tags(site, name)
        writable(mounts[name])
    assert all(p.poll() is None for p in site.agents)  # the agents never stopped

    # On demand (as before a planned plan failover): the point asked for is taken.
    site.ctl("group-set", "erp", "--interval", "1h")
    asked = site.ctl_json("group-tag", "erp")
    assert asked["tag"] == f"group:erp:{asked['at']}"
    site.wait(
        "the group point asked for",
        lambda: (p := common_point(site)) and p["tag"] == asked["tag"],
        timeout=60,
    )
    assert f"common point: {asked['tag']}" in site.ctl("groups").stdout
    site.ctl("group-delete", "erp")
    assert site.ctl_json("groups") == []
    assert site.ctl("group-delete", "erp", check=False).returncode != 0
