"""sd_notify and journald-friendly logging, against real sockets and streams."""

from __future__ import annotations

import io
import logging
import os
import socket
from pathlib import Path

import pytest

from appliance.daemon.logs import JournalFormatter, setup_logging
from appliance.daemon.sdnotify import Notifier


def test_notify_to_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier(str(path))
        assert notifier.ready("Serving")
        message = sock.recv(4096).decode().splitlines()
    assert "READY=1" in message and "STATUS=Serving" in message
    assert f"MAINPID={os.getpid()}" in message


def test_notify_to_abstract_socket() -> None:
    name = f"secondsite-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier("@" + name).watchdog()
        assert sock.recv(64) == b"WATCHDOG=1"


def test_notify_without_manager_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and not notifier.ready("x")


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier("").watchdog_interval == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert Notifier("").watchdog_interval is None


def test_journal_format_prefixes_every_line_with_priority() -> None:
    formatter = JournalFormatter("%(name)s: %(message)s")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom\nsecond", None, None)
    assert formatter.format(record) == "<3>x: boom\n<3>second"


def test_setup_logging_detects_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging("info", journal=True)
    logging.getLogger("secondsite.test").warning("careful")
    assert stream.getvalue() == "<4>secondsite.test: careful\n"
    setup_logging("info", journal=False)
    logging.getLogger("secondsite.test").info("plain")
    assert stream.getvalue().splitlines()[-1].endswith("INFO secondsite.test: plain")


def test_notify_to_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.enabled
    assert not notifier.status("still running")
