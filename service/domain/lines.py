"""A model's line of jobs: who runs next, and who needs a run message at all.

Jobs of one model run one at a time in `submitted_seq` order. Whatever moves a job out of
the line (a worker's final update, the reaper, a cancel) holds the model row's lock and then
wakes the new head (`line_head`). So a submission sends a message only for a job that heads
the line once it commits; a job behind another active one is woken when its turn comes, and
the reaper re-sends wake-ups that were lost. A burst of 1,000 requests on one model used to
send 1,000 messages whose claims only found the job blocked, on the model row's lock that
submissions take too.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.domain.states import ACTIVE_JOB_STATES, JobStatus
from service.storage.tables import Job, Model


def lock_model(session: Session, model_id: str) -> Model | None:
    """Serialise everything that changes one model's job line (no-op lock on SQLite)."""
    return session.execute(
        select(Model).where(Model.id == model_id).with_for_update()
    ).scalar_one_or_none()


def line_head(session: Session, model_id: str) -> str | None:
    """The model's next job to run: the first active job of its line, if it is queued (None
    while one runs or none waits)."""
    row = session.execute(
        select(Job.id, Job.status)
        .where(Job.model_id == model_id, Job.status.in_(ACTIVE_JOB_STATES))
        .order_by(Job.submitted_seq)
        .limit(1)
    ).first()
    return row.id if row is not None and row.status == JobStatus.QUEUED else None


def active_before(session: Session, model_id: str, seq: int) -> bool:
    """Whether a queued or running job of the model is ahead of position ``seq``. Asked under
    the model row's lock, so a job ahead that finishes meanwhile wakes what follows it."""
    found = session.execute(
        select(Job.id)
        .where(
            Job.model_id == model_id,
            Job.status.in_(ACTIVE_JOB_STATES),
            Job.submitted_seq < seq,
        )
        .limit(1)
    ).first()
    return found is not None
