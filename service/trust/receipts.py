"""Erasure receipts: a JWS (RFC 7515, EdDSA per RFC 8037) stating that a deletion request was
carried out.

The payload (format in README.md, "Erasure receipts") names the request, the sha256 of each
record key, the source and result versions' sha256, metrics before and after, the audit
sequence range of the request's events, the chain head at issue time and the signed audit
checkpoint written when the receipt was issued. It is signed with the installation's Ed25519
key (service.trust.signing); anyone holding the public keys of `GET /.well-known/jwks.json` can
check it with any JOSE library, and nobody without the private key can forge one.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import __version__
from service.domain.states import RecordState, RequestStatus
from service.domain.views import iso
from service.errors import Unavailable, conflict, not_found
from service.settings import Settings
from service.storage.objects import Storage
from service.storage.sql import chunked
from service.storage.tables import (
    AuditEvent,
    AuditHead,
    Dataset,
    DeletionRequest,
    Job,
    Model,
    ModelVersion,
    Record,
    utcnow,
)
from service.trust.audit_checkpoints import TYP as CHECKPOINT_TYP
from service.trust.audit_checkpoints import CheckpointError, write_checkpoint
from service.trust.purge import key_sha256
from service.trust.signing import SignatureError, load_signer, verify_compact

log = logging.getLogger("lethe.receipts")

RECEIPT_TYPE = "https://lethe.dev/receipts/erasure/v2"
TYP = "lethe-erasure-receipt+jws"
# The JWT audience claim: a generic JOSE verifier asked for this audience refuses anything
# else signed by the same key (an audit checkpoint carries CHECKPOINT_AUDIENCE).
AUDIENCE = "urn:lethe:erasure-receipt"
PURGE_RETRY_AFTER_S = 2  # a purge rewrites one dataset file: seconds, or one reaper interval


class ReceiptError(ValueError):
    """The receipt is malformed or its signature does not verify."""


def verify(receipt: Any, jwks: dict[str, Any]) -> dict[str, Any]:
    """Check a receipt (the compact JWS, or the API's `{jws, payload}` answer) against a
    JWKS; returns a summary or raises ReceiptError saying what is wrong."""
    token = receipt.get("jws") if isinstance(receipt, dict) else receipt
    if not isinstance(token, str):
        raise ReceiptError("a receipt is a compact JWS, or a JSON object with a `jws` member")
    try:
        header, payload = verify_compact(token.strip(), jwks, TYP)
    except SignatureError as exc:
        raise ReceiptError(str(exc)) from None
    if payload.get("type") != RECEIPT_TYPE or payload.get("aud") != AUDIENCE:
        raise ReceiptError(
            f"not an erasure receipt (type {payload.get('type')!r}, aud {payload.get('aud')!r})"
        )
    # The API's answer carries an unsigned copy for convenience: it must say what is signed.
    if isinstance(receipt, dict) and "payload" in receipt and receipt["payload"] != payload:
        raise ReceiptError(
            "the unsigned `payload` copy differs from the signed payload: it was edited"
        )
    audit = payload.get("audit") or {}
    checkpoint = audit.get("checkpoint") or {}
    try:
        _, signed = verify_compact(str(checkpoint.get("jws")), jwks, CHECKPOINT_TYP)
    except SignatureError as exc:
        raise ReceiptError(f"the embedded audit checkpoint does not verify: {exc}") from None
    if (signed.get("seq"), signed.get("hash")) != (checkpoint.get("seq"), checkpoint.get("hash")):
        raise ReceiptError("the embedded checkpoint's fields differ from its signed payload")
    if (audit.get("last_seq") or 0) > signed["seq"]:
        raise ReceiptError("the checkpoint predates the request's audit events")
    request = payload.get("request") or {}
    return {
        "ok": True,
        "request_id": request.get("id"),
        "key_id": header.get("kid"),
        "records": (payload.get("records") or {}).get("count"),
        "issued_at": payload.get("issued_at"),
        "checkpoint_seq": signed["seq"],
        "payload": payload,
    }


# --------------------------------------------------------------------------- building


def _audit_range(
    session: Session, request: DeletionRequest, job: Job, version_ids: list[str]
) -> list[int]:
    subjects = [request.id, job.id, *version_ids]
    seqs = list(
        session.execute(
            select(AuditEvent.seq).where(
                AuditEvent.subject_id.in_(subjects),
                AuditEvent.action != "version.retired",  # later housekeeping, not this request
            )
        ).scalars()
    )
    first = min(seqs) if seqs else 0
    for seq, payload in session.execute(
        select(AuditEvent.seq, AuditEvent.payload).where(
            AuditEvent.subject_type == "dataset",
            AuditEvent.subject_id == request.dataset_id,
            AuditEvent.action.in_(("records.forgotten", "content.purged")),
            AuditEvent.seq >= first,
        )
    ):
        payload = payload or {}
        if payload.get("job_id") == job.id or job.id in (payload.get("job_ids") or []):
            seqs.append(seq)
    return sorted(seqs)


def issue_receipt(
    factory: sessionmaker[Session], storage: Storage, settings: Settings, request_id: str
) -> dict[str, Any]:
    """`{jws, kid, payload}` for a completed request (409 otherwise); `payload` is a
    convenience copy of what the JWS signs: verifiers read the JWS. It changes nothing in the
    domain: a purge that the save or promotion could not finish is the reaper's (409
    erasure-pending meanwhile); the one write is the signed audit checkpoint it embeds."""
    with factory() as session:
        request = session.get(DeletionRequest, request_id)
        if request is None:
            raise not_found("deletion request", request_id)
        if request.status != RequestStatus.COMPLETED:
            raise conflict(
                "request-not-completed",
                f"deletion request {request_id} is {request.status}; a receipt is issued once a "
                "version without its records is active (status completed)",
                title="Request not completed",
                request_status=request.status,
            )
    document = _document(factory, request_id)
    signer = load_signer(settings)
    # Written after the document: its seq covers every event the receipt names.
    try:
        checkpoint = write_checkpoint(factory, storage, signer)
    except CheckpointError as exc:  # never sign a receipt on top of a tampered log
        raise conflict("audit-chain-broken", str(exc), title="Audit chain broken") from None
    assert checkpoint is not None  # the request's own events are in the log
    document["audit"]["checkpoint"] = {
        k: checkpoint[k] for k in ("seq", "hash", "time", "kid", "jws")
    }
    return {"jws": signer.sign(document, TYP), "kid": signer.kid, "payload": document}


def forgetting_claim(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the receipt claims about forgetting: `exact` (retrained without the records by
    the model's recipe, whose sha256 it cites) or `approximate` (IMU or gradient ascent,
    judged by the per-record membership test, whose evidence it carries: the test, n, the
    statistic, its limit, the band and the false-release rate)."""
    evidence = (metrics.get("after") or {}).get("membership")
    summary = None
    if isinstance(evidence, dict):
        summary = {k: v for k, v in evidence.items() if k != "per_record_z"}
    claim: dict[str, Any] = {
        "kind": metrics.get("forgetting") or "approximate",
        "method": metrics.get("method"),
        "evidence": summary,
        "attempts": [a.get("method") for a in metrics.get("attempts") or []],
    }
    if claim["kind"] == "exact":
        claim["recipe_sha256"] = (metrics.get("influence") or {}).get("recipe_sha256")
    return claim


def _document(factory: sessionmaker[Session], request_id: str) -> dict[str, Any]:
    with factory() as session:
        request = session.get(DeletionRequest, request_id)
        assert request is not None
        job = session.execute(select(Job).where(Job.request_id == request.id)).scalar_one()
        model = session.get(Model, request.model_id)
        dataset = session.get(Dataset, request.dataset_id)
        source = session.get(ModelVersion, job.source_version_id)
        result = session.get(ModelVersion, job.result_version_id)
        assert model is not None and dataset is not None
        assert source is not None and result is not None
        keys = [str(k) for k in request.record_keys]
        records: list[Record] = []
        for chunk in chunked(keys):
            records.extend(
                session.execute(
                    select(Record).where(Record.dataset_id == dataset.id, Record.key.in_(chunk))
                ).scalars()
            )
        not_purged = [
            r.key for r in records if r.purged_at is None or r.state != RecordState.FORGOTTEN
        ]
        if not_purged or len(records) != len(set(keys)):
            # `completed` is set with the activation; the purge follows in its own step (the
            # reaper finishes it if the worker died). Not a conflict: retry shortly.
            raise Unavailable(
                "erasure-pending",
                f"{len(not_purged)} of the request's records are not yet purged from the "
                f"dataset store; retry after {PURGE_RETRY_AFTER_S} s",
                title="Erasure still in progress",
                retry_after_s=PURGE_RETRY_AFTER_S,
            )
        seqs = _audit_range(session, request, job, [result.id])
        head = session.get(AuditHead, 1)
        metrics = job.metrics or {}
        return {
            "type": RECEIPT_TYPE,
            # Registered JWT claims (RFC 7519), for generic verifiers: who, about what, for whom.
            "iss": "lethe",
            "sub": request.id,
            "aud": AUDIENCE,
            "iat": int(utcnow().timestamp()),
            "request": {
                "id": request.id,
                "model": model.name,
                "model_id": model.id,
                "dataset_id": dataset.id,
                "dataset": dataset.name,
                "subject_ref": request.subject_ref,
                "reason": request.reason,
                "method": request.method,
                "status": request.status,
                "created_at": iso(request.created_at),
            },
            "records": {
                "count": len(keys),
                "key_sha256": [key_sha256(k) for k in keys],
                "forgotten_at": iso(max(r.forgotten_at for r in records if r.forgotten_at)),
                "purged_at": iso(max(r.purged_at for r in records if r.purged_at)),
            },
            "job": {
                "id": job.id,
                "finished_at": iso(job.finished_at),
                "served_by": job.served_by_job_id,
            },
            "source_version": {"id": source.id, "number": source.number, "sha256": source.sha256},
            "result_version": {"id": result.id, "number": result.number, "sha256": result.sha256},
            "forgetting": forgetting_claim(metrics),
            "metrics": {
                "before": metrics.get("before") or {},
                "after": metrics.get("after") or {},
                "policy": metrics.get("policy"),
            },
            "audit": {
                "first_seq": seqs[0] if seqs else None,
                "last_seq": seqs[-1] if seqs else None,
                "events": len(seqs),
                "head_seq": head.seq if head else 0,
                "head_hash": head.hash if head else None,
            },
            "issued_at": iso(utcnow()),
            "issuer": {"service": "lethe", "version": __version__},
        }
