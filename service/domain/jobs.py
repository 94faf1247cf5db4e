"""Job queries: one job, and the filtered, cursor-paginated list (newest submission first)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, sessionmaker

from service.domain.models import get_model
from service.domain.pagination import MAX_LIMIT, newest_first, page, time_id_key
from service.domain.states import JOB_STATES
from service.domain.views import job_view
from service.errors import not_found, validation
from service.storage.async_reads import AsyncReads
from service.storage.db import read_once
from service.storage.tables import Job, Model, ModelVersion


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


# Polls and lists read plain rows (job columns + model name, one query): no ORM identity map,
# no second lookup for the model. `job_view` reads the same attribute names from a row.
_JOB_ROW = (
    *Job.__table__.c,
    Model.name.label("model_name"),
    ModelVersion.status.label("result_version_status"),
)
_RESULT = ModelVersion.id == Job.result_version_id


# Built once: constructing and cache-keying the statement per poll was a tenth of its cost.
_SHOW_JOB = (
    select(*_JOB_ROW)
    .outerjoin(Model, Model.id == Job.model_id)
    .outerjoin(ModelVersion, _RESULT)
    .where(Job.id == bindparam("job_id"))
)


def show_job(factory: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    with read_once(factory) as conn:
        row = conn.execute(_SHOW_JOB, {"job_id": job_id}).first()
    if row is None:
        raise not_found("job", job_id)
    return job_view(row, row.model_name, row.result_version_status)


async def poll_job(reads: AsyncReads, job_id: str) -> dict[str, Any]:
    """``show_job`` for PostgreSQL, on the event loop (service.storage.async_reads)."""
    row = await reads.first(_SHOW_JOB, {"job_id": job_id})
    if row is None:
        raise not_found("job", job_id)
    return job_view(row, row.model_name, row.result_version_status)


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
    with factory() as session:
        q = select(*_JOB_ROW).join(Model, Model.id == Job.model_id).outerjoin(ModelVersion, _RESULT)
        if model is not None:
            q = q.where(Job.model_id == get_model(session, model).id)
        if status is not None:
            q = q.where(Job.status == status)
        q = newest_first(q, Job.created_at, Job.id, cursor)
        rows = list(session.execute(q.limit(limit + 1)).all())
    items, next_cursor = page(rows, limit, lambda row: time_id_key(row.created_at, row.id))
    return {
        "items": [job_view(r, r.model_name, r.result_version_status) for r in items],
        "next_cursor": next_cursor,
    }
