"""/v1/deletion-requests: submit (idempotent), list, show, receipt."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response

from service.api.auth import Principal
from service.api.deps import AppState, get_state, require
from service.api.json_keys import unique_json_keys
from service.api.receipt_schemas import ReceiptOut
from service.api.rendering import render
from service.api.request_ids import current_request_id
from service.api.schemas import (
    COMMON_ERRORS,
    DeletionRequestOut,
    Page,
    SubmissionOut,
    problems,
)
from service.domain import request_queries as queries
from service.domain import requests as domain
from service.domain.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.domain.requests import DeletionRequestIn
from service.domain.states import RequestStatus

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
        "returns the first answer (same ids, no new job); a different body is 409. A body that "
        "names a key twice is 422."
    ),
    response_model=SubmissionOut,
    dependencies=[Depends(unique_json_keys)],
    responses={
        202: {"headers": {"Location": {"schema": {"type": "string"}}}},
        **problems(
            400,
            404,
            409,
            413,
            _404="Unknown model",
            _409="No active version, or Idempotency-Key reused",
        ),
    },
)
async def submit(
    body: DeletionRequestIn,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="A retry with the same key and body returns the first answer.",
        ),
    ] = None,
    principal: Principal = Depends(require("submit")),
    state: AppState = Depends(get_state),
) -> Response:
    result = await domain.submit_deletion_request_async(
        state.sessions,
        state.settings,
        body,
        actor=principal.actor,
        idempotency_key=idempotency_key,
        http_request_id=current_request_id(),
    )
    headers = {"Location": f"/v1/jobs/{result.job_id}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return render(SubmissionOut, result.body, status_code=202, headers=headers)


@router.get(
    "/{request_id}/receipt",
    summary="Signed erasure receipt of a completed request",
    description=(
        "`{jws, kid, payload}`: `jws` is a compact JWS (EdDSA, Ed25519; verify it with the "
        "public keys of `/.well-known/jwks.json` and any JOSE library, or `lethe receipt "
        "verify`). Its payload names the request, the sha256 of each record key, source and "
        "result version sha256, metrics before and after, the audit sequence range of the "
        "request's events and the signed audit checkpoint written at issue time. `payload` is "
        "an unsigned copy for convenience. "
        "409 unless the request is `completed`; 503 `erasure-pending` with `Retry-After` "
        "while a completed request's records are still being purged (seconds). "
        'Format: README, "Erasure receipts".'
    ),
    response_model=ReceiptOut,
    # The payload copy must equal the signed one: members a stored document lacks stay absent.
    response_model_exclude_unset=True,
    responses=problems(
        404,
        409,
        503,
        _409="The request is not completed",
        _503="Its records are still being purged (retry after `Retry-After` seconds), or the "
        "database is unavailable",
    ),
)
def receipt(
    request_id: str,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    from service.trust.receipts import issue_receipt

    return issue_receipt(state.sessions, state.storage, state.settings, request_id)


@router.get(
    "",
    summary="List deletion requests (newest submission first)",
    description="Filtered by `status`, `model` (name) and `subject_ref` (exact). Each item is "
    "the request with its job, `result_version` `{id, number, status}` and the release "
    "policy's decision (`policy`: `decision`, `failed`, `reasons`, `checks`).",
    response_model=Page[DeletionRequestOut],
    responses=problems(404, _404="Unknown model"),
)
def list_requests(
    status: Annotated[RequestStatus | None, Query()] = None,
    model: Annotated[str | None, Query(description="Model name.")] = None,
    subject_ref: Annotated[str | None, Query(description="Your reference for the person.")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size.")] = DEFAULT_LIMIT,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return queries.list_requests(
        state.sessions,
        status=status,
        model=model,
        subject_ref=subject_ref,
        cursor=cursor,
        limit=limit,
    )


@router.get(
    "/{request_id}",
    summary="A deletion request, its job and its review state",
    description="`status` is the request's final word: `completed` once a version without the "
    "records is active, `needs_review` while the result waits as a candidate (`policy.reasons` "
    "says why), `rejected`, `failed`, `cancelled`.",
    response_model=DeletionRequestOut,
    responses=problems(404),
)
def show(
    request_id: str,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    return queries.show_request(state.sessions, request_id)
