"""The lifecycle of deletion requests, jobs, model versions and records: every allowed move,
in one place, and one function per move that refuses any other.

    job       queued ─▶ running ─▶ succeeded | failed | cancelled
              queued ─▶ cancelled | failed (no active version);  running ─▶ queued (retry)
    request   queued ─▶ running ─▶ completed | needs_review | failed | cancelled
              running ─▶ queued (its job retried);  needs_review ─▶ completed | rejected
    version   candidate ─▶ active ─▶ superseded;  candidate ─▶ rejected
    record    present ─▶ forgotten

The database enforces the vocabulary (CHECK constraints) and "at most one active version per
model" (a partial unique index; migration 0005), so a move that skips this module still
cannot store a state that does not exist, or a second active version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from service.domain.states import JobStatus, RecordState, RequestStatus, VersionStatus

J, R, V = JobStatus, RequestStatus, VersionStatus

JOB_MOVES: Mapping[str, frozenset[str]] = {
    J.QUEUED: frozenset({J.RUNNING, J.CANCELLED, J.FAILED}),
    J.RUNNING: frozenset({J.QUEUED, J.SUCCEEDED, J.FAILED, J.CANCELLED}),
    J.SUCCEEDED: frozenset(),
    J.FAILED: frozenset(),
    J.CANCELLED: frozenset(),
}
REQUEST_MOVES: Mapping[str, frozenset[str]] = {
    R.QUEUED: frozenset({R.RUNNING, R.CANCELLED, R.FAILED}),
    R.RUNNING: frozenset({R.QUEUED, R.COMPLETED, R.NEEDS_REVIEW, R.FAILED, R.CANCELLED}),
    R.NEEDS_REVIEW: frozenset({R.COMPLETED, R.REJECTED}),
    R.COMPLETED: frozenset(),
    R.FAILED: frozenset(),
    R.CANCELLED: frozenset(),
    R.REJECTED: frozenset(),
}
VERSION_MOVES: Mapping[str, frozenset[str]] = {
    V.CANDIDATE: frozenset({V.ACTIVE, V.REJECTED}),
    V.ACTIVE: frozenset({V.SUPERSEDED}),
    V.SUPERSEDED: frozenset(),
    V.REJECTED: frozenset(),
}
RECORD_MOVES: Mapping[str, frozenset[str]] = {
    RecordState.PRESENT: frozenset({RecordState.FORGOTTEN}),
    RecordState.FORGOTTEN: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move the lifecycle does not allow: a bug in the caller, never a client error."""


def sources(moves: Mapping[str, frozenset[str]], target: str) -> tuple[str, ...]:
    """The states a bulk UPDATE may move to ``target`` from (its WHERE clause)."""
    return tuple(sorted(state for state, to in moves.items() if target in to))


def _move(kind: str, row: Any, attr: str, moves: Mapping[str, frozenset[str]], to: str) -> None:
    now = getattr(row, attr)
    if now == to:
        return  # idempotent: a redelivered message may repeat the move it already made
    if to not in moves.get(now, frozenset()):
        raise IllegalTransition(f"{kind} {getattr(row, 'id', '?')}: {now} → {to} is not allowed")
    setattr(row, attr, to)


def move_job(job: Any, to: JobStatus) -> None:
    _move("job", job, "status", JOB_MOVES, to)


def move_request(request: Any, to: RequestStatus) -> None:
    _move("deletion request", request, "status", REQUEST_MOVES, to)


def move_version(version: Any, to: VersionStatus) -> None:
    _move("model version", version, "status", VERSION_MOVES, to)


def activate_version(session: Session, version: Any, parent: Any) -> None:
    """``parent`` active → superseded, then ``version`` → active: in that order, flushed,
    because the one-active-version index is checked per statement."""
    move_version(parent, VersionStatus.SUPERSEDED)
    session.flush()
    move_version(version, VersionStatus.ACTIVE)
    session.flush()


__all__ = [
    "JOB_MOVES",
    "RECORD_MOVES",
    "REQUEST_MOVES",
    "VERSION_MOVES",
    "IllegalTransition",
    "activate_version",
    "move_job",
    "move_request",
    "move_version",
    "sources",
]
