"""Reading deletion requests: one request, and the filtered, cursor-paginated list.

Each view carries the request's review state: the status of the version its job produced
(`result_version`) and the release policy's decision with its failed checks (`policy`).
Lists are newest submission first (the job's submission sequence, one job per request).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Bundle, Session, aliased, sessionmaker

from service.domain.models import get_model
from service.domain.pagination import MAX_LIMIT, newest_first, page, time_id_key
from service.domain.views import request_view
from service.errors import not_found
from service.storage.tables import DeletionRequest, Job, Model, ModelVersion


def show_request(factory: sessionmaker[Session], request_id: str) -> dict[str, Any]:
    with factory() as session:
        req = session.get(DeletionRequest, request_id)
        if req is None:
            raise not_found("deletion request", request_id)
        job = session.execute(select(Job).where(Job.request_id == req.id)).scalar_one_or_none()
        model = session.get(Model, req.model_id)
        assert model is not None
        result = (
            session.get(ModelVersion, job.result_version_id)
            if job is not None and job.result_version_id
            else None
        )
        return request_view(req, job, model.name, result=result)


def list_requests(
    factory: sessionmaker[Session],
    *,
    status: str | None,
    model: str | None,
    subject_ref: str | None,
    cursor: str | None,
    limit: int,
) -> dict[str, Any]:
    limit = min(limit, MAX_LIMIT)
    result = aliased(ModelVersion)
    # The result's reference only: a whole version row would decode its metrics (hundreds
    # of KB for a coalesced run) once per request it served.
    ref: Bundle[Any] = Bundle("result", result.id, result.number, result.status)
    with factory() as session:
        q = (
            select(DeletionRequest, Job, Model.name, ref)
            .join(Job, Job.request_id == DeletionRequest.id)
            .join(Model, Model.id == DeletionRequest.model_id)
            .outerjoin(result, result.id == Job.result_version_id)
        )
        if model is not None:
            q = q.where(DeletionRequest.model_id == get_model(session, model).id)
        if status is not None:
            q = q.where(DeletionRequest.status == status)
        if subject_ref is not None:
            q = q.where(DeletionRequest.subject_ref == subject_ref)
        q = newest_first(q, Job.created_at, Job.id, cursor)
        rows = list(session.execute(q.limit(limit + 1)).all())
        items, next_cursor = page(
            rows, limit, lambda row: time_id_key(row[1].created_at, row[1].id)
        )
        views = [
            request_view(req, job, name, result=res if res.id is not None else None)
            for req, job, name, res in items
        ]
    return {"items": views, "next_cursor": next_cursor}
