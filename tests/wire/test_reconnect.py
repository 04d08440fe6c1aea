"""Backoff: grows, is capped, resets, and its jitter stays within bounds; retry policy."""

from __future__ import annotations

import random
import ssl

import pytest

from appliance.wire.errors import (
    BadCrc,
    ConnectionClosed,
    ErrorCode,
    MalformedBody,
    PeerError,
    ProtocolViolation,
)
from appliance.wire.reconnect import Backoff, is_transient


def test_grows_exponentially_then_is_capped() -> None:
    backoff = Backoff(initial=0.2, maximum=5.0, factor=2.0, jitter=0.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert backoff.attempts == 8


def test_reset_starts_over() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0, jitter=0.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() == pytest.approx(0.5)


def test_jitter_stays_within_bounds_and_never_passes_the_cap() -> None:
    backoff = Backoff(initial=0.2, maximum=30.0, factor=2.0, jitter=0.2, rng=random.Random(42))
    seen = []
    for attempt in range(40):
        base = min(30.0, 0.2 * 2.0**attempt)
        delay = backoff.next_delay()
        assert base * 0.8 - 1e-9 <= delay <= min(30.0, base * 1.2) + 1e-9
        seen.append(delay / base)
    assert len({round(r, 6) for r in seen}) > 10  # it really jitters


def test_same_seed_same_delays() -> None:
    def delays(seed: int) -> list[float]:
        backoff = Backoff(rng=random.Random(seed))
        return [backoff.next_delay() for _ in range(10)]

    assert delays(1) == delays(1)
    assert delays(1) != delays(2)


def test_a_very_long_outage_does_not_overflow() -> None:
    backoff = Backoff(initial=0.2, maximum=30.0, jitter=0.0)
    backoff.attempts = 100_000
    assert backoff.next_delay() == 30.0


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0.0}, {"initial": 5.0, "maximum": 1.0}, {"factor": 0.5}, {"jitter": 1.0}],
)
def test_nonsense_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionClosed("reset"), True),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (ssl.SSLCertVerificationError("bad server cert"), False),
        (PeerError(ErrorCode.STORAGE_FAILURE, "disk full"), True),
        (PeerError(ErrorCode.SHUTTING_DOWN), True),
        (PeerError(ErrorCode.OUT_OF_WINDOW), True),
        (PeerError(ErrorCode.UNKNOWN_DISK), False),
        (PeerError(ErrorCode.INVALID_REQUEST), False),
        (PeerError(ErrorCode.BAD_VERSION), False),
        (BadCrc(), True),
        (MalformedBody(), False),
        (ProtocolViolation(), False),
        (ValueError(), False),
    ],
)
def test_which_failures_are_worth_a_retry(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient
