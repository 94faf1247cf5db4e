"""/v1/deletion-requests: submit (idempotent) and show."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse

from service.api.deps import AppState, get_state, require
from service.api.schemas import COMMON_ERRORS, DeletionRequestOut, SubmissionOut
from service.auth import Principal
from service.domain import requests as domain
from service.domain.requests import DeletionRequestIn

router = APIRouter(
    prefix="/v1/deletion-requests", tags=["deletion requests"], responses=COMMON_ERRORS
)


@router.post(
    "",
    status_code=202,
    summary="Ask a model to forget records",
    description=(
        "Validates everything first: unknown model 404, no active version 409, record keys "
        "that are missing, already forgotten or named by a queued/running request 422 (listing "
        "them), params bounds-checked. Answers 202 `{id, status, job: {id, status}}` with "
        "`Location: /v1/jobs/{job_id}`. With `Idempotency-Key`, a retry with the same body "
        "returns the first answer (same ids, no new job); a different body is 409."
    ),
    response_model=SubmissionOut,
    responses={
        202: {"headers": {"Location": {"schema": {"type": "string"}}}},
        404: {"description": "Unknown model"},
        409: {"description": "No active version, or Idempotency-Key reused"},
    },
)
def submit(
    body: DeletionRequestIn,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    principal: Principal = Depends(require("submit")),
    state: AppState = Depends(get_state),
) -> JSONResponse:
    result = domain.submit_deletion_request(
        state.sessions, state.settings, body, actor=principal.actor,
        idempotency_key=idempotency_key,
    )
    headers = {"Location": f"/v1/jobs/{result.job_id}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(result.body, status_code=202, headers=headers)


@router.get(
    "/{request_id}",
    summary="A deletion request and its job's state",
    response_model=DeletionRequestOut,
)
def show(
    request_id: str,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return domain.show_request(state.sessions, request_id)
