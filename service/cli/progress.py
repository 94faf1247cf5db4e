"""Live job display: one rich progress bar per job phase (shared by `jobs watch` and the demo)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from service.domain.states import PHASES, TERMINAL_JOB_STATES, JobStatus


class JobProgress:
    """Feed it every polled job document; it keeps a bar per phase up to date.

    The job's `progress` is read as the fraction of the current phase done, so every bar
    reaches 100 % when its phase ends; phases the job has moved past are completed even if
    no poll saw them running (short phases can fall between two polls).
    """

    def __init__(self, console: Console | None = None, *, title: str = "job") -> None:
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(bar_width=32),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._title = title
        self._status_task: TaskID | None = None

    def __enter__(self) -> JobProgress:
        self.progress.__enter__()
        self._status_task = self.progress.add_task(
            f"[bold]{self._title}", total=None, note=JobStatus.QUEUED, start=False
        )
        for phase in PHASES:
            self._tasks[phase] = self.progress.add_task(
                f"  {phase}", total=100, note="", start=False
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, job: dict[str, Any]) -> None:
        status = str(job.get("status") or "")
        phase = job.get("phase")
        fraction = float(job.get("progress") or 0.0)
        timings = job.get("timings") or {}
        if self._status_task is not None:
            self.progress.update(self._status_task, note=status)
            if status == JobStatus.RUNNING:
                self._start(self._status_task)  # the clock counts from the claim, not the POST
            elif status in TERMINAL_JOB_STATES:
                self._start(self._status_task)
                self.progress.stop_task(self._status_task)
        current = PHASES.index(phase) if phase in PHASES else -1
        for i, name in enumerate(PHASES):
            task = self._tasks[name]
            seconds = _phase_seconds(timings, name)
            note = f"{seconds:.2f}s" if seconds is not None else ""
            if i < current or status == JobStatus.SUCCEEDED:
                self._start(task)
                self.progress.update(task, completed=100, note=note)
                self.progress.stop_task(task)
            elif i == current and status == JobStatus.RUNNING:
                self._start(task)
                self.progress.update(task, completed=min(100.0, fraction * 100.0), note=note)
            elif i == current and status in (JobStatus.FAILED, JobStatus.CANCELLED):
                self.progress.update(task, note=f"[red]{status}")
                self.progress.stop_task(task)

    def _start(self, task: TaskID) -> None:
        if not self.progress.tasks[task].started:
            self.progress.start_task(task)


def _phase_seconds(timings: dict[str, Any], phase: str) -> float | None:
    """Seconds spent in a phase, from the job's `timings` whichever key style it uses."""
    for key in (phase, f"{phase}_s", f"{phase}_seconds"):
        value = timings.get(key)
        if isinstance(value, int | float):
            return float(value)
    return None
