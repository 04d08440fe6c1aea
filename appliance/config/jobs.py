"""Jobs: persistent state machines made of idempotent steps.

A job is a row in the inventory (kind, subject, params, state, the index of its current
step, percent). The engine runs each job's steps in order on the event loop. A step is
a coroutine returning True when its work is done and False to be polled again later
(waiting for an agent, for an initial sync); it raises `JobFailed` to fail the job
with a message for the operator. The step index is stored *after* a step finishes, so
a crash re-runs at most the step that was running: every step must be idempotent
(look before you act). At start the engine resumes every queued or running job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance.config.api import JobProgress, Signal
from appliance.config.errors import Conflict
from appliance.config.inventory import Inventory
from appliance.config.model import JobKind, JobState

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job cannot finish; the message is for the operator."""


@dataclass
class JobContext:
    """What a step sees: its job, the inventory, and a way to report progress."""

    job_id: str
    kind: JobKind
    subject: str
    params: dict[str, Any]
    inventory: Inventory
    clock: Callable[[], float]
    step_percent: float = 0.0  # the running step's own progress, 0..100

    def progress(self, percent: float) -> None:
        self.step_percent = max(0.0, min(100.0, percent))


StepFn = Callable[[JobContext], Awaitable[bool]]


@dataclass(frozen=True)
class Step:
    name: str
    run: StepFn
    timeout: float | None = None  # seconds this step may wait before the job fails


Definitions = dict[JobKind, Callable[[dict[str, Any]], list[Step]]]


class JobEngine:
    def __init__(
        self,
        inventory: Inventory,
        definitions: Definitions,
        emit: Callable[[Signal], None],
        clock: Callable[[], float],
        poll: float = 2.0,
    ) -> None:
        self._inventory = inventory
        self._definitions = definitions
        self._emit = emit
        self._clock = clock
        self._poll = poll
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wakes: dict[str, tuple[str, asyncio.Event]] = {}  # job id -> (subject, event)

    def submit(self, kind: JobKind, subject: str, params: dict[str, Any] | None = None) -> str:
        """Store a new job and start it; Conflict if the subject already has one running."""
        active = self._inventory.active_job_for(subject)
        if active is not None:
            raise Conflict(
                f"{subject} already has a {active['kind']} job running ({active['id']}); "
                "wait for it or follow it with 'secondsitectl job'"
            )
        job_id = f"{kind.value}-{secrets.token_hex(4)}"
        self._inventory.add_job(job_id, kind.value, subject, params or {}, self._clock())
        self._start(job_id)
        return job_id

    def resume(self) -> int:
        """Start every job a previous run left unfinished; how many."""
        jobs = self._inventory.unfinished_jobs()
        for job in jobs:
            log.info(
                "resuming job %s (%s of %s) at step %s",
                job["id"],
                job["kind"],
                job["subject"],
                job["step"] or "start",
            )
            self._start(job["id"])
        return len(jobs)

    def poke(self, subject: str | None = None) -> None:
        """Something about `subject` changed (None: anything): its waiting steps look
        again now instead of at their next poll. Only that subject's jobs wake, so a
        thousand machines reporting do not make a thousand jobs look each time."""
        for job_subject, event in self._wakes.values():
            if subject is None or job_subject == subject:
                event.set()

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job_id), name=f"job {job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _run(self, job_id: str) -> None:
        job = self._inventory.job(job_id)
        kind = JobKind(job["kind"])
        steps = self._definitions[kind](job["params"])
        ctx = JobContext(job_id, kind, job["subject"], job["params"], self._inventory, self._clock)
        index = int(job["step_index"] or 0)
        self._update(ctx, JobState.RUNNING, index, steps)
        try:
            while index < len(steps):
                step = steps[index]
                ctx.step_percent = 0.0
                self._update(ctx, JobState.RUNNING, index, steps)
                await self._run_step(ctx, step, index, steps)
                index += 1
                ctx.step_percent = 0.0
                self._update(ctx, JobState.RUNNING, index, steps)
        except JobFailed as exc:
            log.warning("job %s failed at %s: %s", job_id, steps[index].name, exc)
            self._finish(ctx, JobState.FAILED, index, steps, str(exc))
            return
        except asyncio.CancelledError:
            raise  # shutting down: the job stays running in the inventory and resumes
        except Exception:
            log.exception("bug in job %s at step %s", job_id, steps[index].name)
            self._finish(
                ctx,
                JobState.FAILED,
                index,
                steps,
                "internal error; see the configuration server's journal",
            )
            return
        self._finish(ctx, JobState.SUCCEEDED, index, steps, None)

    async def _run_step(self, ctx: JobContext, step: Step, index: int, steps: list[Step]) -> None:
        started = self._clock()
        last = ctx.step_percent
        wake = asyncio.Event()
        self._wakes[ctx.job_id] = (ctx.subject, wake)
        try:
            while not await step.run(ctx):
                if step.timeout is not None and self._clock() - started > step.timeout:
                    raise JobFailed(f"{step.name} did not finish within {step.timeout:.0f} s")
                if ctx.step_percent != last:
                    last = ctx.step_percent
                    self._update(ctx, JobState.RUNNING, index, steps)
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll):
                        await wake.wait()
        finally:
            self._wakes.pop(ctx.job_id, None)

    def _percent(self, ctx: JobContext, index: int, steps: list[Step]) -> float:
        if not steps:
            return 100.0
        return round(min(100.0, (index + ctx.step_percent / 100) / len(steps) * 100), 1)

    def _update(self, ctx: JobContext, state: JobState, index: int, steps: list[Step]) -> None:
        step = steps[index].name if index < len(steps) else "done"
        percent = self._percent(ctx, index, steps)
        self._inventory.update_job(
            ctx.job_id,
            state=state.value,
            step=step,
            step_index=index,
            percent=percent,
            updated_at=self._clock(),
        )
        self._emit(JobProgress(ctx.job_id, state.value, step, percent))

    def _finish(
        self, ctx: JobContext, state: JobState, index: int, steps: list[Step], error: str | None
    ) -> None:
        now = self._clock()
        step = steps[index].name if index < len(steps) else "done"
        percent = 100.0 if state is JobState.SUCCEEDED else self._percent(ctx, index, steps)
        self._inventory.update_job(
            ctx.job_id,
            state=state.value,
            step=step,
            step_index=index,
            percent=percent,
            error=error,
            updated_at=now,
            finished_at=now,
        )
        self._inventory.add_event(
            "info" if state is JobState.SUCCEEDED else "warning",
            ctx.subject,
            f"job-{state.value}",
            f"{ctx.kind.value} job {ctx.job_id} {state.value}" + (f": {error}" if error else ""),
            now,
        )
        self._emit(JobProgress(ctx.job_id, state.value, step, percent))
