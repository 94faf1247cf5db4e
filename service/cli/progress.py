"""Live job display: one rich progress bar per job phase (shared by `jobs watch` and the demo).

Exact forgetting adds a `retraining` bar, shown only once a job enters that phase, with the
epoch the retrain is in; a job that gets there after unlearning escalated, and a line says so.
"""

from __future__ import annotations

from collections.abc import Callable
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

from service.domain.states import PHASES, TERMINAL_JOB_STATES, JobStatus, Phase


class JobProgress:
    """Feed it every polled job document; it keeps a bar per phase up to date.

    The job's `progress` is read as the fraction of the current phase done, so every bar
    reaches 100 % when its phase ends; phases the job has moved past are completed even if
    no poll saw them running (short phases can fall between two polls).
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        title: str = "job",
        recipe_epochs: Callable[[str], int | None] | None = None,
    ) -> None:
        """``recipe_epochs(model name)``: the epochs of the model's recipe, asked once a job
        retrains (for the bar's "epoch k/n")."""
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
        self._retrain_task: TaskID | None = None  # shown once the job retrains
        self._recipe_epochs = recipe_epochs
        self._epochs: int | None = None
        self._seen: set[str] = set()

    def __enter__(self) -> JobProgress:
        self.progress.__enter__()
        self._status_task = self.progress.add_task(
            f"[bold]{self._title}", total=None, note=JobStatus.QUEUED, start=False
        )
        for phase in PHASES:
            self._tasks[phase] = self.progress.add_task(
                f"  {phase}", total=100, note="", start=False
            )
            if phase == Phase.EVALUATING:  # where an escalated job retrains, in order
                self._retrain_task = self.progress.add_task(
                    f"  {Phase.RETRAINING}", total=100, note="", start=False, visible=False
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
        self._retraining(job, status, phase, fraction)
        if phase == Phase.RETRAINING:  # between two evaluations: the others stay as they are
            return
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

    def _retraining(self, job: dict[str, Any], status: str, phase: Any, fraction: float) -> None:
        task = self._retrain_task
        if phase is not None:
            self._seen.add(str(phase))
        if _phase_seconds(job.get("timings") or {}, Phase.RETRAINING) is not None:
            self._seen.add(Phase.RETRAINING)  # a short retrain between two polls
        if task is None or Phase.RETRAINING not in self._seen:
            return
        if not self.progress.tasks[task].visible:
            self.progress.update(task, visible=True)
            self._start(task)
            if Phase.UNLEARNING in self._seen or (job.get("timings") or {}).get("unlearning"):
                self.progress.console.print(
                    f"{self._title}: the approximate result would be held; escalating to exact "
                    "forgetting (retraining by the model's recipe, without the records)"
                )
            if self._recipe_epochs is not None and job.get("model"):
                try:
                    self._epochs = self._recipe_epochs(str(job["model"]))
                except Exception:  # the bar works without it
                    self._epochs = None
        if phase == Phase.RETRAINING and status == JobStatus.RUNNING:
            note = ""
            if self._epochs:
                epoch = min(self._epochs, int(fraction * self._epochs) + 1)
                note = f"epoch {epoch}/{self._epochs}"
            self.progress.update(task, completed=min(100.0, fraction * 100.0), note=note)
        elif status in (JobStatus.FAILED, JobStatus.CANCELLED) and phase == Phase.RETRAINING:
            self.progress.update(task, note=f"[red]{status}")
            self.progress.stop_task(task)
        elif phase != Phase.RETRAINING:  # moved on: evaluating the retrained model, saving
            seconds = _phase_seconds(job.get("timings") or {}, Phase.RETRAINING)
            note = f"{seconds:.2f}s" if seconds is not None else ""
            self.progress.update(task, completed=100, note=note)
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
