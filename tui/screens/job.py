"""Follows one job by polling GetJob until it has finished; leaving does not stop it.

Dismissed with the last record seen (None before the first answer), so a wizard can
act on how its job ended (a push job's first contact asks for the host key).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Static

from tui.client import ConsoleClient, describe, record
from tui.widgets.error_line import ErrorLine
from tui.widgets.job_progress import FINISHED, JobProgress

RETRY_S = 2.0  # after a failed poll: the server may be restarting


class JobScreen(Screen[dict[str, Any] | None]):
    DEFAULT_CSS = """
    JobScreen > Vertical { padding: 1 2; }
    JobScreen #keys { margin-top: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "back", "Back")]

    def __init__(
        self,
        client: ConsoleClient,
        job_id: str,
        poll_s: float,
        *,
        leave_when: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.job_id = job_id
        self.poll_s = poll_s
        self.leave_when = leave_when  # a finished job the caller takes over at once
        self.job: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"Following job {self.job_id}", id="title", markup=False)
            yield ErrorLine(id="error")
            yield JobProgress(self.job_id, id="progress")
            yield Static("Esc: back (the job goes on without this screen)", id="keys")

    def on_mount(self) -> None:
        self.follow()

    @work(exclusive=True, group="job")
    async def follow(self) -> None:
        progress = self.query_one(JobProgress)
        error = self.query_one(ErrorLine)
        while True:
            try:
                job = record(await self.client.call("GetJob", self.job_id))
            except Exception as exc:
                text = describe(exc)
                if text is None:
                    raise  # a bug: let the worker fail loudly
                error.show_error(text)
                await asyncio.sleep(RETRY_S)
                continue
            error.show_error(None)
            self.job = job
            progress.post_message(JobProgress.Update(job))
            if job.get("state") in FINISHED:
                if self.leave_when is not None and self.leave_when(job):
                    self.dismiss(job)
                    return
                self.query_one("#keys", Static).update(
                    f"Job {job.get('state')}. Esc or Enter: back"
                )
                return
            await asyncio.sleep(self.poll_s)

    def action_back(self) -> None:
        self.dismiss(self.job)
