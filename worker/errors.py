"""How a job attempt can end early, and the problem documents recorded for it.

`JobError` is deterministic (retrying cannot help: the job fails at once); the control-flow
exceptions stop an attempt for a reason outside the job; `is_transient` names the faults of
the world a retry may outlive (database, broker, storage, memory); anything else is a bug in
Lethe, and the job fails at once with the traceback in its error (`bug_problem`).
"""

from __future__ import annotations

import traceback
from typing import Any

from service.errors import problem_dict


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
            slug,
            title,
            detail,
            status,
            errors,
        )

    def problem(self) -> dict[str, Any]:
        return problem_dict(self.slug, self.title, self.status, self.detail, self.errors)


def checkpoint_corrupt(title: str, detail: str) -> JobError:
    """Stored weights or model files are not what was registered: a storage fault (500)."""
    return JobError("checkpoint-corrupt", title, detail[:2000], status=500)


def unsupported_dataset(name: str, kind: str, needs: str) -> JobError:
    return JobError(
        "unsupported-dataset",
        "Unsupported dataset",
        f"dataset {name!r} is of kind {kind!r}; {needs}",
    )


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
        "time-limit",
        "Job exceeded its time limit",
        504,
        f"the job ran longer than {limit_s} s",
    )


def is_time_limit(exc: BaseException) -> bool:
    """Celery's soft/hard time-limit exceptions, recognised without importing Celery."""
    return type(exc).__name__ in {"SoftTimeLimitExceeded", "TimeLimitExceeded"}


# Modules whose exceptions are network or service faults (S3, HTTP, Redis, the broker).
_TRANSIENT_MODULES = ("botocore", "boto3", "urllib3", "httpx", "redis", "kombu", "amqp")


def is_transient(exc: BaseException) -> bool:
    """A fault of the world, not of the code: a retry (with backoff) may succeed."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(
        exc,
        (SourceChanged, OperationalError, InterfaceError, PoolTimeout, OSError, MemoryError),
    ):
        return True  # OSError: storage, sockets, disks (ConnectionError, TimeoutError too)
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    cls = type(exc)
    if cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch"):
        return True  # CUDA out of memory: another job may have held the device
    return cls.__module__.split(".", 1)[0] in _TRANSIENT_MODULES


def bug_problem(exc: BaseException) -> dict[str, Any]:
    """The job's error for a bug: what was raised and where (the last frames)."""
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return problem_dict(
        "internal-error",
        "Job failed on an error in Lethe",
        500,
        f"{type(exc).__name__}: {exc}"[:2000],
        traceback="".join(frames)[-8000:],
    )
