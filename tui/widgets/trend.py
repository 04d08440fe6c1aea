"""A two-row sparkline of the last hour that the Linux VT can draw.

Textual's Sparkline uses the eighth blocks (U+2581..U+2587), which the VT's console
fonts lack; the lower half block and the full block are in every one (CP437), so two
rows give five levels per column: blank, half, full, full + half, full + full.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.text import Text
from textual.widget import Widget

from tui.history import History

HALF = "\u2584"  # lower half block
FULL = "\u2588"  # full block
LEVELS = 4  # cells of height 1/2 in two rows


def columns(values: list[float | None], top: float) -> tuple[str, str]:
    """The (upper, lower) rows for `values` scaled so that `top` fills both rows."""
    upper, lower = [], []
    for value in values:
        if value is None:  # no sample then (console not running, server unreachable)
            upper.append(" ")
            lower.append(" ")
            continue
        # Anything above zero shows at least half a cell: small is not nothing.
        level = 0 if value <= 0 or top <= 0 else max(1, round(min(value / top, 1.0) * LEVELS))
        lower.append(" " if level == 0 else HALF if level == 1 else FULL)
        upper.append(" " if level <= 2 else HALF if level == 3 else FULL)
    return "".join(upper), "".join(lower)


class TrendLine(Widget):
    """`LABEL  now X  peak Y` beside the hour's sparkline; `fmt` formats values."""

    DEFAULT_CSS = """
    TrendLine { height: 2; }
    """

    LABEL_WIDTH = 26

    def __init__(
        self,
        label: str,
        history: History,
        fmt: Callable[[object], str],
        *,
        clock: Callable[[], float] = time.time,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id)
        self.label = label
        self.history = history
        self.fmt = fmt
        self.clock = clock

    def render(self) -> Text:
        width = max(self.size.width - self.LABEL_WIDTH, 4)
        now = self.history.latest()
        peak = self.history.peak()
        head = f"{self.label} {self.fmt(now)}"[: self.LABEL_WIDTH - 1]
        tail = f"  peak {self.fmt(peak)}"[: self.LABEL_WIDTH - 1]
        values = self.history.buckets(width, self.clock())
        upper, lower = columns(values, peak or 0.0)
        text = Text(no_wrap=True, overflow="crop")
        text.append(head.ljust(self.LABEL_WIDTH), style="bold")
        text.append(upper + "\n")
        text.append(tail.ljust(self.LABEL_WIDTH), style="dim")
        text.append(lower)
        return text
