"""The vocabulary shared by the API, the CLI and the worker: one definition each.

`StrEnum` members compare equal to their strings, so stored values and JSON need no casts.
"""

from __future__ import annotations

import enum
from typing import Literal, get_args


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Phase(enum.StrEnum):
    """The phases of a running job, in order (worker.execution)."""

    LOADING = "loading"
    INFLUENCE = "influence"
    UNLEARNING = "unlearning"
    EVALUATING = "evaluating"
    SAVING = "saving"
    # Exact forgetting (method retrain, or escalation from a held approximate result):
    # training again by the model's recipe, between an evaluation and the next.
    RETRAINING = "retraining"


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    NEEDS_REVIEW = "needs_review"  # the version waits as a candidate (service.trust.policy)
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"


class VersionStatus(enum.StrEnum):
    ACTIVE = "active"
    CANDIDATE = "candidate"
    SUPERSEDED = "superseded"
    REJECTED = "rejected"


class RecordState(enum.StrEnum):
    PRESENT = "present"
    FORGOTTEN = "forgotten"  # a version without it is active; purge then removes its content


JOB_STATES: tuple[JobStatus, ...] = tuple(JobStatus)
# The phases every job runs, in order; RETRAINING only runs when a job forgets exactly.
PHASES: tuple[Phase, ...] = tuple(p for p in Phase if p != Phase.RETRAINING)
ACTIVE_JOB_STATES = (JobStatus.QUEUED, JobStatus.RUNNING)
# A request in these states holds the records it names (as does one awaiting review).
ACTIVE_REQUEST_STATES = (RequestStatus.QUEUED, RequestStatus.RUNNING)
TERMINAL_JOB_STATES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
# The request's status when its job ends (a candidate version overrides `completed`).
REQUEST_STATUS_OF_JOB = {
    JobStatus.SUCCEEDED: RequestStatus.COMPLETED,
    JobStatus.FAILED: RequestStatus.FAILED,
    JobStatus.CANCELLED: RequestStatus.CANCELLED,
}

# Datasets and request methods. Literal types (not enums) so that the OpenAPI document keeps
# its inline enums; the tuples are the same values for checks and help texts.
DatasetKind = Literal["tensor", "text"]
DatasetRole = Literal["train", "eval", "member_probe"]
Method = Literal["imu", "ga", "retrain"]
DATASET_KINDS: tuple[str, ...] = get_args(DatasetKind)
DATASET_ROLES: tuple[str, ...] = get_args(DatasetRole)
METHODS: tuple[str, ...] = get_args(Method)
ENGINE_METHODS = ("imu", "ga")  # approximate, run by the engine; retrain is exact
