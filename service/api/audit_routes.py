"""/v1/audit: page through the hash-chained log and verify it; the public JWKS."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import select

from service.api.auth import Principal
from service.api.deps import AppState, get_state, require
from service.api.rendering import render
from service.api.schemas import COMMON_ERRORS, AuditEventOut, JWKSOut, Page, VerifyOut
from service.domain.pagination import DEFAULT_LIMIT, MAX_LIMIT, decode_cursor, page
from service.storage.tables import AuditEvent
from service.trust.audit import event_dict
from service.trust.audit_checkpoints import verify_with_checkpoints
from service.trust.signing import load_signer

SUBJECT_TYPES = ("api_key", "dataset", "model", "model_version", "deletion_request", "job")

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=COMMON_ERRORS)
jwks_router = APIRouter(tags=["keys"])


@router.get(
    "", summary="Page through audit events (oldest first)", response_model=Page[AuditEventOut]
)
def list_events(
    subject: Annotated[
        str | None,
        Query(description="A subject id, or `type:id` (e.g. `job:<id>`, `dataset:<id>`)."),
    ] = None,
    subject_type: Annotated[str | None, Query()] = None,
    subject_id: Annotated[str | None, Query()] = None,
    action: Annotated[str | None, Query()] = None,
    cursor: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    _: Principal = Depends(require("read")),
    state: AppState = Depends(get_state),
) -> dict[str, Any]:
    after = decode_cursor(cursor, 1)
    q = select(AuditEvent).order_by(AuditEvent.seq)
    if subject:
        kind, sep, ident = subject.partition(":")
        if sep and kind in SUBJECT_TYPES:
            q = q.where(AuditEvent.subject_type == kind, AuditEvent.subject_id == ident)
        else:
            q = q.where(AuditEvent.subject_id == subject)
    if subject_type:
        q = q.where(AuditEvent.subject_type == subject_type)
    if subject_id:
        q = q.where(AuditEvent.subject_id == subject_id)
    if action:
        q = q.where(AuditEvent.action == action)
    if after:
        q = q.where(AuditEvent.seq > int(after[0]))
    with state.sessions() as session:
        rows = list(session.execute(q.limit(limit + 1)).scalars())
        items, next_cursor = page(rows, limit, lambda e: [e.seq])
        return {"items": [event_dict(e) for e in items], "next_cursor": next_cursor}


@router.get(
    "/verify",
    summary="Recompute the hash chain and check it against every signed checkpoint",
    description=(
        "`{ok, checked, head_hash, first_bad_seq, reason, checkpoints, latest_checkpoint}`. "
        "Fails on a broken link, and on a chain that ends before, or differs at, a signed "
        "checkpoint in object storage (deleted events, a rewound head, a recomputed chain)."
    ),
    response_model=VerifyOut,
)
def verify(
    _: Principal = Depends(require("read")), state: AppState = Depends(get_state)
) -> dict[str, Any]:
    signer = load_signer(state.settings)
    with state.sessions() as session:
        return verify_with_checkpoints(session, state.storage, signer.jwks())


@jwks_router.get(
    "/.well-known/jwks.json",
    summary="Public keys (JWKS, RFC 7517) that sign receipts and audit checkpoints",
    description="No authentication: verifying a receipt needs only these keys.",
    response_model=JWKSOut,
)
def jwks(state: AppState = Depends(get_state)) -> Response:
    return render(
        JWKSOut,
        load_signer(state.settings).jwks(),
        headers={"Cache-Control": "public, max-age=300"},
    )
