"""Reconnect policy: capped exponential backoff, and which failures are worth a retry.

Kept apart from the connection (which only moves bytes) and from the sender (which
only keeps the stream's order), so each can be tested and changed on its own.
"""

from __future__ import annotations

import random
import ssl

from appliance.wire.errors import ConnectionClosed, ErrorCode, PeerError, WireError

# Failures that a new connection can cure: the link, the peer restarting, a full or
# failing disk on the receiver that an operator fixes, a bug that a restart clears.
# Anything else (a bad disk id, a request the receiver refuses, a protocol mismatch)
# would fail the same way on every retry and must reach the caller instead.
TRANSIENT_CODES = frozenset(
    {
        ErrorCode.TRUNCATED,
        ErrorCode.BAD_CRC,
        ErrorCode.OUT_OF_WINDOW,
        ErrorCode.WINDOW_EXCEEDED,
        ErrorCode.STORAGE_FAILURE,
        ErrorCode.INTERNAL,
        ErrorCode.SHUTTING_DOWN,
    }
)


def is_transient(exc: BaseException) -> bool:
    """True if reconnecting (after a backoff delay) may succeed where `exc` failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False  # the server's certificate is wrong: an operator must act
    if isinstance(exc, ConnectionClosed | OSError | TimeoutError):
        return True
    if isinstance(exc, PeerError):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, WireError):
        # Our own decoder refused the peer's bytes: corruption on the link retries,
        # a peer that speaks another protocol does not.
        return exc.code in TRANSIENT_CODES
    return False


class Backoff:
    """Delays between reconnect attempts: initial * factor**n, capped, with jitter.

    Each delay is the capped exponential times a uniform factor in
    [1 - jitter, 1 + jitter], and never more than `maximum`. Jitter spreads the
    reconnects of many senders after a receiver restart.
    """

    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {initial}, {maximum}")
        if factor < 1 or not 0 <= jitter < 1:
            raise ValueError(f"need factor >= 1 and 0 <= jitter < 1, got {factor}, {jitter}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self.attempts = 0

    def base_delay(self, attempt: int) -> float:
        """The delay before jitter for the given attempt number (0-based)."""
        try:
            return min(self.maximum, self.initial * self.factor**attempt)
        except OverflowError:  # a long outage: float(factor**attempt) overflowed
            return self.maximum

    def next_delay(self) -> float:
        base = self.base_delay(self.attempts)
        self.attempts += 1
        spread = self._rng.uniform(-self.jitter, self.jitter)
        return min(self.maximum, base * (1.0 + spread))

    def reset(self) -> None:
        """Call once a connection is established and working again."""
        self.attempts = 0
