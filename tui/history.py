"""The last hour of a polled value, kept in memory for the dashboard's trend lines.

Nothing is persisted: a restarted console starts with an empty hour. Samples arrive
once per refresh (seconds apart), so an hour is a few thousand floats at most.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 3600.0


@dataclass
class History:
    window_s: float = WINDOW_S
    _samples: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, when: float, value: float | None) -> None:
        """Record a sample; None (unknown, e.g. no recovery point yet) leaves a gap."""
        if value is not None:
            self._samples.append((when, float(value)))
        while self._samples and self._samples[0][0] < when - self.window_s:
            self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)

    def latest(self) -> float | None:
        return self._samples[-1][1] if self._samples else None

    def peak(self) -> float | None:
        return max(v for _, v in self._samples) if self._samples else None

    def buckets(self, count: int, now: float) -> list[float | None]:
        """The window cut into `count` equal slices, oldest first: each slice's
        highest sample (a spike must not vanish by averaging), None where empty."""
        out: list[float | None] = [None] * max(count, 0)
        if count <= 0:
            return out
        start = now - self.window_s
        for when, value in self._samples:
            i = min(int((when - start) / self.window_s * count), count - 1)
            if i < 0:
                continue
            current = out[i]
            out[i] = value if current is None else max(current, value)
        return out
