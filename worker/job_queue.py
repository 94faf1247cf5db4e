"""The job queue in the database: the claim, row locks, per-model ordering, requeue, finish.

Per-model ordering. The database is the single source of truth; broker messages are only
wake-up calls. A job may be claimed only when no earlier-submitted job of the same model is
still queued or running. The claim runs in one transaction that first locks the model row
(SELECT … FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises every writer), so two
workers can never both pass that check for one model, whatever the number of workers or
queues. A message for a job that cannot run yet is acknowledged and dropped: no busy spinning,
no held messages. When a job reaches a final state the runner wakes the next queued job of
that model (`wake_next`), and the reaper re-sends wake-ups for any head-of-line job whose
message was lost (broker restart), so nothing waits forever. Each job starts from the model's
active version at claim time, so deletions compound.

Everything here is plain SQL over a session: the runner (worker.execution) and the reaper
(worker.reaper) share it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.domain.backoff import JITTER, backoff_delay
from service.domain.lifecycle import move_job, move_request
from service.domain.lines import line_head, lock_model
from service.domain.models import active_version
from service.domain.states import (
    ACTIVE_JOB_STATES,
    REQUEST_STATUS_OF_JOB,
    TERMINAL_JOB_STATES,
    JobStatus,
    Phase,
    RequestStatus,
    VersionStatus,
)
from service.errors import problem_dict
from service.storage.db import transaction
from service.storage.objects import Storage
from service.storage.sql import affected_rows
from service.storage.tables import DeletionRequest, Job, ModelVersion, utcnow
from service.trust.audit import append_event
from worker.context import Outcome, RunnerContext
from worker.errors import worker_lost_problem
from worker.lease import claim_terms, holder_is_dead, lease_until

log = logging.getLogger("lethe.worker")


@dataclass
class Claim:
    outcome: Outcome | None  # None = claimed, proceed
    job_id: str
    model_id: str = ""
    attempt: int = 0
    detail: str = ""
    http_request_id: str | None = None  # the API request that created the job (for logs)


@dataclass(frozen=True)
class Fence:
    """One claim of one job: every write after the claim checks it still holds."""

    job_id: str
    model_id: str
    worker_id: str
    attempt: int

    def holds(self, job: Job | None) -> bool:
        """The job is still running under this worker and this attempt."""
        terms = claim_terms(self.worker_id, self.attempt).items()
        return job is not None and all(getattr(job, name) == value for name, value in terms)


def lock_claimed(session: Session, fence: Fence) -> Job | None:
    """Lock the model, then the job; the job only if the claim still holds."""
    lock_model(session, fence.model_id)
    job = lock_job(session, fence.job_id)
    return job if fence.holds(job) else None


def retry_delay(attempt: int) -> float:
    """How long a job waits before its next attempt after a transient failure."""
    return backoff_delay(attempt, jitter=JITTER)


# --------------------------------------------------------------------------- locks and lines


def lock_job(session: Session, job_id: str) -> Job | None:
    return session.execute(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def blocking_job(session: Session, job: Job) -> str | None:
    """Id of a job of the same model that must finish before `job` may start."""
    return session.execute(
        select(Job.id)
        .where(
            Job.model_id == job.model_id,
            Job.id != job.id,
            (Job.status == JobStatus.RUNNING)
            | ((Job.status == JobStatus.QUEUED) & (Job.submitted_seq < job.submitted_seq)),
        )
        .order_by(Job.submitted_seq)
        .limit(1)
    ).scalar_one_or_none()


def runnable_jobs(session: Session) -> list[str]:
    """Heads of every model's line that are queued, oldest submission first."""
    rows = session.execute(
        select(Job.id, Job.model_id, Job.status, Job.submitted_seq)
        .where(Job.status.in_(ACTIVE_JOB_STATES))
        .order_by(Job.submitted_seq)
    ).all()
    seen: set[str] = set()
    heads = []
    for row in rows:
        if row.model_id in seen:
            continue
        seen.add(row.model_id)
        if row.status == JobStatus.QUEUED:
            heads.append(row.id)
    return heads


def lease_is_live(lease_expires_at: datetime | None, worker_id: str | None) -> bool:
    """A running job's holder still counts: its lease has not run out and it is not dead."""
    return (
        lease_expires_at is not None
        and lease_expires_at > utcnow()
        and not holder_is_dead(worker_id)
    )


# --------------------------------------------------------------------------- transitions


def finish_job(
    session: Session,
    job: Job,
    status: JobStatus,
    *,
    actor: str,
    error: dict[str, Any] | None = None,
    payload: dict[str, Any] | None = None,
    request_status: RequestStatus | None = None,
    events: list[dict[str, Any]] | None = None,
) -> None:
    """Move a job (and its request) to a final state with its audit event.

    `request_status` overrides the request's usual status (a succeeded job whose version
    waits for review leaves its request `needs_review`, not `completed`). With `events` the
    audit event is added to that list for the caller to append in bulk."""
    if job.served_by_job_id is None:  # a served job serves nobody
        release_members(session, job.id, actor=actor, reason=f"its run ended {status}")
    move_job(job, status)
    job.finished_at = utcnow()
    job.lease_expires_at = None
    if error is not None:
        job.error = error
    request = session.get(DeletionRequest, job.request_id)
    if request is not None:
        move_request(request, request_status or REQUEST_STATUS_OF_JOB[status])
    body = {"attempts": job.attempts, **(payload or {})}
    if error is not None:
        body["error"] = {"type": error.get("type"), "detail": error.get("detail")}
    event: dict[str, Any] = {
        "actor": actor,
        "action": f"job.{status}",
        "subject_type": "job",
        "subject_id": job.id,
        "payload": body,
    }
    if events is None:
        append_event(session, **event)
    else:
        events.append(event)


def requeue(
    session: Session, job: Job, *, actor: str, error: dict[str, Any] | None, reason: str
) -> None:
    """Put a running job back in the queue (its attempts are kept)."""
    release_members(session, job.id, actor=actor, reason=reason)
    if error is not None:
        job.error = error
    payload = {"attempts": job.attempts, "reason": reason}
    _back_in_queue(
        session,
        job,
        actor=actor,
        action="job.requeued",
        payload=payload | ({"error": error.get("detail")} if error else {}),
    )


def _back_in_queue(
    session: Session, job: Job, *, actor: str, action: str, payload: dict[str, Any]
) -> None:
    """Queued again, with nothing of the run that held it, and its request with it."""
    move_job(job, JobStatus.QUEUED)
    job.worker_id = job.lease_expires_at = job.phase = None
    job.progress = 0.0
    request = session.get(DeletionRequest, job.request_id)
    if request is not None:
        move_request(request, RequestStatus.QUEUED)
    append_event(
        session, actor=actor, action=action, subject_type="job", subject_id=job.id, payload=payload
    )


def release_members(session: Session, leader_id: str, *, actor: str, reason: str) -> int:
    """The jobs a coalesced run served go back to the queue when the run does not succeed
    (each may well succeed alone); one whose cancel was asked meanwhile is cancelled."""
    members = session.execute(
        select(Job)
        .where(Job.served_by_job_id == leader_id, Job.status == JobStatus.RUNNING)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalars()
    released = 0
    for member in members:
        member.served_by_job_id = None
        if member.cancel_requested:
            finish_job(
                session,
                member,
                JobStatus.CANCELLED,
                actor=actor,
                payload={"was_served_by": leader_id},
            )
            continue
        _back_in_queue(
            session,
            member,
            actor=actor,
            action="job.released",
            payload={"served_by": leader_id, "reason": reason},
        )
        released += 1
    return released


def retry_or_finish(
    session: Session,
    job: Job,
    *,
    actor: str,
    max_attempts: int,
    error: dict[str, Any],
    reason: str,
) -> JobStatus | None:
    """After a failed attempt: cancelled if asked, failed once attempts are spent, else
    back in the queue. The final status, or None when requeued."""
    if job.cancel_requested:
        finish_job(session, job, JobStatus.CANCELLED, actor=actor)
        return JobStatus.CANCELLED
    if job.attempts >= max_attempts:
        finish_job(session, job, JobStatus.FAILED, actor=actor, error=error)
        return JobStatus.FAILED
    requeue(session, job, actor=actor, error=error, reason=reason)
    return None


def checkpoint_key(model_id: str, job_id: str, attempt: int) -> str:
    return f"checkpoints/{model_id}/job-{job_id}-a{attempt}.safetensors"


def cleanup_job_checkpoints(
    storage: Storage, model_id: str, job_id: str, keep: str | None = None
) -> list[str]:
    """Delete files that attempts of this job wrote but never committed (best effort)."""
    removed = []
    try:
        for key in list(storage.iter_keys(f"checkpoints/{model_id}/job-{job_id}-")):
            if key != keep:
                storage.delete(key)
                removed.append(key)
    except Exception as exc:
        log.warning("job %s: could not clean up checkpoints: %s", job_id, exc)
    return removed


# --------------------------------------------------------------------------- claim


def claim_job(ctx: RunnerContext, job_id: str) -> Claim:
    """Atomically take a queued job (or one whose holder's lease expired or who died).

    One transaction: lock the model row, then the job row, re-check every condition on the
    locked rows (final? live lease elsewhere? cancel requested? attempts left? an earlier job
    of the model unfinished?) and move queued/expired-running → running with attempt + 1,
    worker id, lease and source version. Equivalent to a conditional UPDATE, but the model
    lock also makes the ordering check race-free across workers.
    """
    settings = ctx.settings
    device = ctx.device  # resolved before the transaction; may raise DeviceUnavailable
    with transaction(ctx.session_factory) as session:
        model_id = session.execute(
            select(Job.model_id).where(Job.id == job_id)
        ).scalar_one_or_none()
        if model_id is None:
            return Claim(Outcome.MISSING, job_id, detail="no such job")
        lock_model(session, model_id)
        job = lock_job(session, job_id)
        assert job is not None
        if job.status in TERMINAL_JOB_STATES:
            return Claim(Outcome.FINISHED, job_id, model_id, detail=f"already {job.status}")
        existing = session.execute(
            select(ModelVersion.id, ModelVersion.status).where(ModelVersion.job_id == job_id)
        ).first()
        if existing is not None:  # defensive: a version exists, so the job is done
            job.result_version_id = existing.id
            job.progress = 1.0
            finish_job(
                session,
                job,
                JobStatus.SUCCEEDED,
                actor=ctx.actor,
                payload={"recovered": True},
                request_status=RequestStatus.NEEDS_REVIEW
                if existing.status == VersionStatus.CANDIDATE
                else None,
            )
            return Claim(Outcome.FINISHED, job_id, model_id, detail="version already exists")
        if job.status == JobStatus.RUNNING and job.served_by_job_id is not None:
            leader = job.served_by_job_id
            return Claim(Outcome.BUSY, job_id, model_id, detail=f"served by job {leader}")
        if job.status == JobStatus.RUNNING and lease_is_live(job.lease_expires_at, job.worker_id):
            return Claim(Outcome.BUSY, job_id, model_id, detail=f"held by {job.worker_id}")
        if job.cancel_requested:
            finish_job(session, job, JobStatus.CANCELLED, actor=ctx.actor)
            return Claim(Outcome.CANCELLED, job_id, model_id, detail="cancelled before start")
        if job.attempts >= settings.max_attempts:
            finish_job(
                session,
                job,
                JobStatus.FAILED,
                actor=ctx.actor,
                # A running job's holder is the last attempt's worker; job.error may still
                # name the worker of an earlier attempt.
                error=worker_lost_problem(job.worker_id)
                if job.status == JobStatus.RUNNING
                else job.error or worker_lost_problem(None),
            )
            return Claim(Outcome.FAILED, job_id, model_id, detail="attempts exhausted")
        blocker = blocking_job(session, job)
        if blocker is not None:
            return Claim(Outcome.BLOCKED, job_id, model_id, detail=f"waits for job {blocker}")
        source = active_version(session, model_id)
        if source is None:
            finish_job(
                session,
                job,
                JobStatus.FAILED,
                actor=ctx.actor,
                error=problem_dict(
                    "no-active-version",
                    "Model has no active version",
                    409,
                    "the model has no active version to unlearn from",
                ),
            )
            return Claim(Outcome.FAILED, job_id, model_id, detail="no active version")
        takeover = job.status == JobStatus.RUNNING
        # Compare-and-swap on (status, attempts): every claim bumps attempts, so the UPDATE
        # matches only if nobody claimed the job since we read it, even without row locks.
        swapped = affected_rows(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == job.status, Job.attempts == job.attempts)
            .values(
                status=JobStatus.RUNNING,
                attempts=Job.attempts + 1,
                worker_id=ctx.worker_id,
                device=device,
                lease_expires_at=lease_until(settings.lease_seconds),
                phase=Phase.LOADING,
                progress=0.0,
                source_version_id=source.id,
                started_at=func.coalesce(Job.started_at, utcnow()),
            )
            .execution_options(synchronize_session=False),
        )
        if swapped != 1:
            return Claim(Outcome.BUSY, job_id, model_id, detail="claimed by another worker")
        session.refresh(job)
        request = session.get(DeletionRequest, job.request_id)
        if request is not None:
            move_request(request, RequestStatus.RUNNING)
        append_event(
            session,
            actor=ctx.actor,
            action="job.claimed",
            subject_type="job",
            subject_id=job.id,
            payload={
                "attempt": job.attempts,
                "device": device,
                "source_version_id": source.id,
                "takeover": takeover,
            },
        )
        return Claim(None, job_id, model_id, job.attempts, http_request_id=job.http_request_id)


def wake_next(ctx: RunnerContext, model_id: str) -> None:
    """Tell the executor that the model's next queued job may start now."""
    if ctx.wake is None or not model_id:
        return
    try:
        with transaction(ctx.session_factory) as session:
            nxt = line_head(session, model_id)
        if nxt is not None:
            ctx.wake(nxt)
    except Exception as exc:  # the reaper re-sends lost wake-ups
        log.warning("model %s: could not wake the next job: %s", model_id, exc)
