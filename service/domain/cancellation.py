"""Cancelling a job: at once while it is queued, at its next progress report while it runs."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.domain.lifecycle import REQUEST_MOVES, sources
from service.domain.lines import active_before, line_head, lock_model
from service.domain.queue import enqueue_job
from service.domain.states import JobStatus, RequestStatus
from service.errors import conflict, not_found
from service.settings import Settings
from service.storage.db import transaction
from service.storage.sql import affected_rows
from service.storage.tables import DeletionRequest, Job, Model, utcnow
from service.trust.audit import append_event


@dataclass
class CancelResult:
    job: Job
    model_name: str


def cancel_job(
    factory: sessionmaker[Session], settings: Settings, job_id: str, *, actor: str
) -> CancelResult:
    """Queued: cancelled now, and the job that waited behind it is woken. Running: cancel
    requested (the worker stops at its next progress report). Finished: 409. Conditional
    UPDATEs make this safe against a worker's claim."""
    with transaction(factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise not_found("job", job_id)
        # The model row's lock, as everything that moves a job out of its line takes it: a
        # submission meanwhile sees this job's new state when it asks who heads the line.
        lock_model(session, job.model_id)
        head: str | None = None
        now = utcnow()
        cancelled = affected_rows(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)  # running: asked below
            .values(status=JobStatus.CANCELLED, finished_at=now, cancel_requested=True),
        )
        if cancelled:
            session.execute(
                update(DeletionRequest)
                .where(
                    DeletionRequest.id == job.request_id,
                    DeletionRequest.status.in_(sources(REQUEST_MOVES, RequestStatus.CANCELLED)),
                )
                .values(status=RequestStatus.CANCELLED)
            )
            append_event(
                session,
                actor=actor,
                action="job.cancelled",
                subject_type="job",
                subject_id=job_id,
                payload={"request_id": job.request_id, "was": JobStatus.QUEUED},
            )
            if not active_before(session, job.model_id, job.submitted_seq):  # it was the head
                head = line_head(session, job.model_id)  # what waited behind it
        else:
            requested = affected_rows(
                session,
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(cancel_requested=True),
            )
            if requested:
                append_event(
                    session,
                    actor=actor,
                    action="job.cancel_requested",
                    subject_type="job",
                    subject_id=job_id,
                    payload={"request_id": job.request_id, "was": JobStatus.RUNNING},
                )
            else:
                session.refresh(job)
                raise conflict(
                    "job-finished",
                    f"job {job_id} has already finished ({job.status})",
                    title="Job already finished",
                    job_status=job.status,
                )
        session.refresh(job)
        model = session.get(Model, job.model_id)
        assert model is not None
        result = CancelResult(job=job, model_name=model.name)
    if head is not None:
        enqueue_job(settings, head)
    return result
