"""FIFREEZE with a hard bound on a real ext4 loop mount: writers block while frozen and
resume after the thaw, the deadline thaws whatever the body does, scripts run around it.

Every test thaws its filesystem at teardown whatever happened (`ensure_thawed`): a
writer blocked on a frozen filesystem cannot even be killed."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import FreezeTimeout, QuiesceFailed
from agent.quiesce import freeze
from tests.agent.tracking import ensure_thawed
from tests.loopfs import loop_ext4

pytestmark = pytest.mark.root


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    with loop_ext4(tmp_path, 32) as (_, mountpoint):
        try:
            yield mountpoint
        finally:
            assert not ensure_thawed(mountpoint), "a test left the filesystem frozen"


class Writer(threading.Thread):
    """Writes one file with fsync; `finished` tells whether it got through."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.finished = threading.Event()

    def run(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"x" * 4096)
            os.fsync(f.fileno())
        self.finished.set()


def test_writes_block_while_frozen_and_resume_after_thaw(mnt: Path) -> None:
    with freeze([mnt], timeout=5.0) as handle:
        assert handle.mountpoints == [mnt]
        writer = Writer(mnt / "blocked")
        writer.start()
        assert not writer.finished.wait(0.5)
    assert writer.finished.wait(5.0)
    assert handle.duration is not None and 0.5 <= handle.duration < 5.0
    assert not handle.overran


def test_hard_bound_thaws_during_a_long_body_and_reports_the_overrun(mnt: Path) -> None:
    writer = Writer(mnt / "late")
    with pytest.raises(FreezeTimeout) as caught, freeze([mnt], timeout=0.3) as handle:
        writer.start()
        # The body outlives the bound: the writer gets through while it still runs.
        assert writer.finished.wait(3.0)
        assert handle.expired()
    assert handle.overran
    assert caught.value.bound == 0.3
    assert handle.duration is not None and handle.duration >= 0.3


def test_exception_in_the_body_thaws(mnt: Path) -> None:
    with pytest.raises(KeyboardInterrupt), freeze([mnt], timeout=5.0):
        raise KeyboardInterrupt
    writer = Writer(mnt / "after")
    writer.start()
    assert writer.finished.wait(5.0)


def test_a_later_freeze_failure_thaws_the_earlier_ones(mnt: Path) -> None:
    # procfs has no freeze support: FIFREEZE fails after the loop fs froze.
    with pytest.raises(QuiesceFailed, match="/proc"), freeze([mnt, Path("/proc")], timeout=5.0):
        pytest.fail("the body must not run")
    writer = Writer(mnt / "after")
    writer.start()
    assert writer.finished.wait(5.0)


def test_an_unmounted_mountpoint_is_refused_not_its_parent_frozen(mnt: Path) -> None:
    # A directory on the loop fs stands for a protected mountpoint that was unmounted:
    # FIFREEZE on it would freeze its parent (here the loop fs; on a host, the root).
    stale = mnt / "was-a-mountpoint"
    stale.mkdir()
    with pytest.raises(QuiesceFailed, match="no longer a mountpoint"), freeze([stale], 5.0):
        pytest.fail("the body must not run")
    writer = Writer(mnt / "not-blocked")
    writer.start()
    assert writer.finished.wait(5.0)


def test_bind_mount_of_the_same_filesystem_is_frozen_once(mnt: Path, tmp_path: Path) -> None:
    bind = tmp_path / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(mnt), str(bind)], check=True)
    try:
        with freeze([mnt, bind], timeout=5.0) as handle:
            assert handle.mountpoints == [mnt]
    finally:
        subprocess.run(["umount", str(bind)], check=True)


def test_pre_script_failure_means_no_freeze_and_post_still_runs(mnt: Path, tmp_path: Path) -> None:
    post_mark = tmp_path / "post-ran"
    with (
        pytest.raises(QuiesceFailed, match="exited with 3: app refuses"),
        freeze(
            [mnt],
            pre=["sh", "-c", "echo app refuses; exit 3"],
            post=["touch", str(post_mark)],
        ),
    ):
        pytest.fail("the body must not run")
    assert post_mark.exists()
    assert not ensure_thawed(mnt)  # never frozen


def test_scripts_run_in_order_around_the_freeze(mnt: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with freeze(
        [mnt],
        pre=["sh", "-c", f"echo pre >> {log}"],
        post=["sh", "-c", f"echo post >> {log}"],
    ):
        log.write_text(log.read_text() + "body\n")
    assert log.read_text().split() == ["pre", "body", "post"]


def test_post_failure_is_kept_not_raised(mnt: Path) -> None:
    with freeze([mnt], post=["false"]) as handle:
        pass
    assert handle.post_failure is not None and "exited with 1" in handle.post_failure


def test_script_timeout_kills_the_process_group(tmp_path: Path) -> None:
    started = time.monotonic()
    with (
        pytest.raises(QuiesceFailed, match="ran over"),
        freeze([], pre=["sh", "-c", "sleep 30 & sleep 30"], script_timeout=0.5),
    ):
        pytest.fail("the body must not run")
    assert time.monotonic() - started < 5
