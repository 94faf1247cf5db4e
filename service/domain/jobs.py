"""Job queries: one job, and the filtered, cursor-paginated list (newest submission first)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.domain.models import get_model
from service.domain.pagination import MAX_LIMIT, decode_cursor, page
from service.domain.views import job_view
from service.models import Job, Model
from service.problems import not_found, validation
from service.states import JOB_STATES


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def show_job(factory: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    with factory() as session:
        job = get_job(session, job_id)
        model = session.get(Model, job.model_id)
        return job_view(job, model.name if model else None)


def list_jobs(
    factory: sessionmaker[Session],
    *,
    status: str | None,
    model: str | None,
    cursor: str | None,
    limit: int,
) -> dict[str, Any]:
    if status is not None and status not in JOB_STATES:
        raise validation(
            f"status must be one of {', '.join(JOB_STATES)}",
            [{"field": "status", "message": "invalid"}],
        )
    limit = min(limit, MAX_LIMIT)
    after = decode_cursor(cursor, 1)
    with factory() as session:
        q = select(Job, Model.name).join(Model, Model.id == Job.model_id)
        if model is not None:
            q = q.where(Job.model_id == get_model(session, model).id)
        if status is not None:
            q = q.where(Job.status == status)
        if after:
            q = q.where(Job.submitted_seq < int(after[0]))
        rows = list(session.execute(q.order_by(Job.submitted_seq.desc()).limit(limit + 1)).all())
        items, next_cursor = page(rows, limit, lambda row: [row[0].submitted_seq])
        return {"items": [job_view(j, name) for j, name in items], "next_cursor": next_cursor}
