"""Errors: one class per code, the peer's codes kept, counters exact under threads."""

from __future__ import annotations

import threading

import pytest

from appliance.wire.errors import (
    ConnectionClosed,
    ErrorCode,
    ErrorCounters,
    MalformedFrame,
    PeerError,
    WireError,
    error_for,
)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_error_for_builds_the_leaf_for_each_code(code: ErrorCode) -> None:
    error = error_for(code, "details")
    assert error.code is code
    assert error.message == "details"
    assert type(error) is not WireError  # a specific leaf
    assert isinstance(error, MalformedFrame) == (1 <= code <= 7)
    assert str(error) == f"{code.name.lower()}: details"


def test_error_for_an_unknown_number() -> None:
    error = error_for(4242, "from the future")
    assert type(error) is WireError
    assert error.code is ErrorCode.INTERNAL
    assert "4242" in error.message


def test_peer_error_keeps_the_peers_code() -> None:
    known = PeerError(ErrorCode.STORAGE_FAILURE, "disk full")
    assert known.code is ErrorCode.STORAGE_FAILURE and known.raw_code == 13
    assert "disk full" in str(known)
    future = PeerError(999, "new")
    assert future.code is ErrorCode.INTERNAL and future.raw_code == 999
    assert isinstance(ConnectionClosed(), WireError)


def test_counters_are_exact_under_threads() -> None:
    counters = ErrorCounters()

    def hammer() -> None:
        for _ in range(5000):
            counters.count(ErrorCode.BAD_CRC)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters.count(ErrorCode.BAD_CERTIFICATE, 3)
    assert counters.get(ErrorCode.BAD_CRC) == 40_000
    snap = counters.snapshot()
    assert snap["bad_crc"] == 40_000 and snap["bad_certificate"] == 3
    assert set(snap) == {c.name.lower() for c in ErrorCode}
    assert counters.total() == 40_003
