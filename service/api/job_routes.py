"""/v1/jobs: list, poll, cancel."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from service.api.auth import Principal
from service.api.deps import AppState, get_state, require, run_read
from service.api.rendering import render
from service.api.schemas import COMMON_ERRORS, JobOut, Page, problems
from service.domain import jobs as domain
from service.domain.cancellation import cancel_job
from service.domain.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.domain.states import JobStatus
from service.domain.views import job_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON_ERRORS)


@router.get(
    "",
    summary="List jobs (newest submission first), filtered by status and model",
    response_model=Page[JobOut],
    responses=problems(404, _404="Unknown model"),
)
async def list_jobs(
    status: Annotated[JobStatus | None, Query()] = None,
    model: Annotated[str | None, Query(description="Model name.")] = None,
    cursor: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> Response:
    page = await run_read(
        state,
        partial(
            domain.list_jobs, state.sessions, status=status, model=model, cursor=cursor, limit=limit
        ),
    )
    return render(Page[JobOut], page)


@router.get(
    "/{job_id}",
    summary="Poll a job",
    description="`{id, method, status, phase, progress, attempts, error, source_version_id, "
    "result_version_id, result_version_status, policy, metrics, created_at, started_at, "
    "finished_at, ...}`. `result_version_status` is `candidate` while the release policy holds "
    "the result for review; `policy` is its decision with every check and `reasons`. The "
    "deletion request (`GET /v1/deletion-requests/{id}`) carries the final word.",
    response_model=JobOut,
    responses=problems(404),
)
async def show_job(
    job_id: str, _: Principal = Depends(require("read")), state: AppState = Depends(get_state)
) -> Response:
    if state.async_reads is not None:
        return render(JobOut, await domain.poll_job(state.async_reads, job_id))
    return render(JobOut, await run_read(state, domain.show_job, state.sessions, job_id))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    summary="Cancel a queued job, or ask a running one to stop",
    description="Queued: cancelled at once. Running: `cancel_requested` is set and the worker "
    "stops at its next progress report. Already finished: 409.",
    response_model=JobOut,
    responses=problems(404, 409, _409="The job has already finished"),
)
def cancel(
    job_id: str,
    principal: Principal = Depends(require("submit")),
    state: AppState = Depends(get_state),
) -> Response:
    result = cancel_job(state.sessions, state.settings, job_id, actor=principal.actor)
    return render(JobOut, job_view(result.job, result.model_name), status_code=202)
