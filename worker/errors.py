"""How a job attempt can end early, and the problem documents recorded for it.

`JobError` is deterministic (retrying cannot help: the job fails at once); the control-flow
exceptions stop an attempt for a reason outside the job; anything else is transient.
"""

from __future__ import annotations

from typing import Any

from service.api.problems import problem_dict


class JobError(Exception):
    """A deterministic failure: retrying the job cannot change the outcome."""

    def __init__(
        self,
        slug: str,
        title: str,
        detail: str,
        *,
        status: int = 422,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.slug, self.title, self.detail, self.status, self.errors = (
            slug, title, detail, status, errors,
        )  # fmt: skip

    def problem(self) -> dict[str, Any]:
        return problem_dict(self.slug, self.title, self.status, self.detail, self.errors)


class Cancelled(Exception):
    """cancel_requested was seen: stop, create nothing."""


class Interrupted(Exception):
    """The worker is shutting down: hand the job back without spending an attempt."""


class LeaseLost(Exception):
    """Another worker owns the job now (our lease expired and was taken over)."""


class SourceChanged(Exception):
    """The model's active version moved while the job ran: retry from the new one."""


def transient_problem(exc: BaseException) -> dict[str, Any]:
    return problem_dict(
        "job-attempt-failed",
        "Job attempt failed",
        503,
        f"{type(exc).__name__}: {exc}"[:2000],
    )


def worker_lost_problem(worker_id: str | None) -> dict[str, Any]:
    return problem_dict(
        "worker-lost",
        "Worker lost",
        503,
        f"the worker running this job ({worker_id or 'unknown'}) stopped renewing its lease",
    )


def time_limit_problem(limit_s: float) -> dict[str, Any]:
    return problem_dict(
        "time-limit", "Job exceeded its time limit", 504,
        f"the job ran longer than {limit_s} s",
    )  # fmt: skip


def is_time_limit(exc: BaseException) -> bool:
    """Celery's soft/hard time-limit exceptions, recognised without importing Celery."""
    return type(exc).__name__ in {"SoftTimeLimitExceeded", "TimeLimitExceeded"}
