"""One job followed to its end: state, step, an ASCII progress bar, the step's detail
line and the error if any.

Updates arrive as `JobProgress.Update` messages, one per GetJob poll; a newer one
replaces an older one still waiting in the queue (`can_replace`), so a slow screen
never works through a backlog of stale percentages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual import on
from textual.message import Message
from textual.widget import Widget

from appliance.config.model import JobState
from appliance.ctl.render import fmt_percent, fmt_text, progress_bar

FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobProgress(Widget):
    DEFAULT_CSS = """
    JobProgress { height: auto; min-height: 4; }
    """

    @dataclass
    class Update(Message):
        job: dict[str, Any] = field(default_factory=dict)

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, JobProgress.Update)

    def __init__(self, job_id: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.job_id = job_id
        self.job: dict[str, Any] = {}

    @property
    def state(self) -> str | None:
        state = self.job.get("state")
        return state if isinstance(state, str) else None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @on(Update)
    def _update(self, event: Update) -> None:
        # A finished job may drop its step or percent: keep the last ones seen.
        merged = {**self.job, **{k: v for k, v in event.job.items() if v is not None}}
        if merged.get("state") == JobState.SUCCEEDED:
            merged["percent"] = 100.0
        self.job = merged
        self.refresh(layout=True)

    def render(self) -> Text:
        job: Mapping[str, Any] = self.job
        width = max(self.size.width, 20)
        state = fmt_text(job.get("state") or "starting")
        bar = progress_bar(job.get("percent"), min(width - 8, 50))
        text = Text()
        text.append(f"Job {self.job_id}: {fmt_text(job.get('kind'))} ")
        text.append(f"of {fmt_text(job.get('subject'))}\n")
        text.append(f"{bar} {fmt_percent(job.get('percent')):>4}\n")
        marker = "" if job.get("state") != JobState.FAILED else "! "
        style = "bold reverse" if marker else "bold"
        text.append(f"{marker}{state.upper()}", style=style)
        text.append(f"  {fmt_text(job.get('step'))}")
        # What the step is doing now, when the job says (a push job: each remote step).
        result = job.get("result")
        detail = result.get("detail") if isinstance(result, dict) else None
        if detail:
            text.append(f"\nDetail: {fmt_text(detail)}")
        if job.get("error"):
            text.append(f"\nError: {fmt_text(job.get('error'))}")
        return text
