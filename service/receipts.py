"""Erasure receipts: a signed JSON statement that a deletion request was carried out.

The document (format in README.md, "Erasure receipts") names the request, the sha256 of each
record key, the source and result versions' sha256, metrics before and after, the audit
sequence range of the request's events and the chain head at issue time. It is signed with
HMAC-SHA256 over its canonical JSON (keys sorted, no whitespace, UTF-8; the `signature`
member left out).

The key is `LETHE_RECEIPT_HMAC_KEY`. When that is empty, a random per-installation key is
created on first use at `LETHE_HOME/receipt-hmac.key` (mode 0600) and reused; a deployment
with several API hosts must set LETHE_RECEIPT_HMAC_KEY so that every host signs alike.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import __version__
from service.audit import canonical_json
from service.domain.views import iso
from service.models import (
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
from service.problems import conflict, not_found
from service.purge import key_sha256
from service.settings import Settings
from service.sql import chunked

log = logging.getLogger("lethe.receipts")

RECEIPT_TYPE = "https://lethe.dev/receipts/erasure/v1"
ALGORITHM = "HMAC-SHA256"
KEY_FILE = "receipt-hmac.key"


class ReceiptError(ValueError):
    """The receipt is malformed or its signature does not match."""


# --------------------------------------------------------------------------- keys


def key_file(settings: Settings) -> Path:
    return Path(settings.home) / KEY_FILE


def load_or_create_key(settings: Settings) -> bytes:
    """The signing key: the setting, else the installation's key file (created once)."""
    if settings.receipt_hmac_key:
        return settings.receipt_hmac_key.encode("utf-8")
    path = key_file(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(32)
        try:
            # O_EXCL: two processes racing on first use agree on the one that won.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secret + "\n")
            log.warning(
                "LETHE_RECEIPT_HMAC_KEY is not set: created a per-installation receipt key at "
                "%s (mode 0600); set LETHE_RECEIPT_HMAC_KEY when several hosts issue receipts",
                path,
            )
    return read_key_file(path)


def read_key_file(path: Path) -> bytes:
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ReceiptError(f"the key file {path} is empty")
    return key.encode("utf-8")


def key_id(key: bytes) -> str:
    """A public fingerprint of the key, so a verifier can tell which key signed."""
    return hashlib.sha256(b"lethe-receipt-key\x00" + key).hexdigest()[:16]


# --------------------------------------------------------------------------- signing


def signing_input(document: dict[str, Any]) -> bytes:
    body = {k: v for k, v in document.items() if k != "signature"}
    return canonical_json(body).encode("utf-8")


def sign(document: dict[str, Any], key: bytes) -> dict[str, Any]:
    mac = hmac.new(key, signing_input(document), hashlib.sha256).hexdigest()
    return {**document, "signature": {"alg": ALGORITHM, "key_id": key_id(key), "value": mac}}


def verify(document: Any, key: bytes) -> dict[str, Any]:
    """Check a receipt; returns a summary or raises ReceiptError saying what is wrong."""
    if not isinstance(document, dict):
        raise ReceiptError("a receipt is a JSON object")
    if document.get("type") != RECEIPT_TYPE:
        raise ReceiptError(f"not an erasure receipt (type {document.get('type')!r})")
    signature = document.get("signature")
    if not isinstance(signature, dict) or not isinstance(signature.get("value"), str):
        raise ReceiptError("the receipt has no signature")
    if signature.get("alg") != ALGORITHM:
        raise ReceiptError(f"unsupported signature algorithm {signature.get('alg')!r}")
    expected = hmac.new(key, signing_input(document), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature["value"]):
        if signature.get("key_id") != key_id(key):
            raise ReceiptError(
                f"signature mismatch: the receipt names key {signature.get('key_id')!r}, the "
                f"key given is {key_id(key)!r} (wrong key, or the receipt was modified)"
            )
        raise ReceiptError("signature mismatch: the receipt was modified after it was issued")
    request = document.get("request") or {}
    return {
        "ok": True,
        "request_id": request.get("id"),
        "key_id": signature.get("key_id"),
        "records": (document.get("records") or {}).get("count"),
        "issued_at": document.get("issued_at"),
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
    factory: sessionmaker[Session], settings: Settings, request_id: str
) -> dict[str, Any]:
    """The signed receipt of a completed request (409 otherwise). Read-only: a purge that
    the save or promotion could not finish is the reaper's (409 erasure-pending meanwhile)."""
    with factory() as session:
        request = session.get(DeletionRequest, request_id)
        if request is None:
            raise not_found("deletion request", request_id)
        if request.status != "completed":
            raise conflict(
                "request-not-completed",
                f"deletion request {request_id} is {request.status}; a receipt is issued once a "
                "version without its records is active (status completed)",
                title="Request not completed", request_status=request.status,
            )
    document = _document(factory, request_id)
    return sign(document, load_or_create_key(settings))


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
        not_purged = [r.key for r in records if r.purged_at is None or r.state != "forgotten"]
        if not_purged or len(records) != len(set(keys)):
            raise conflict(
                "erasure-pending",
                f"{len(not_purged)} of the request's records are not yet purged from the "
                "dataset store; try again shortly",
                title="Erasure still in progress",
            )
        seqs = _audit_range(session, request, job, [result.id])
        head = session.get(AuditHead, 1)
        metrics = job.metrics or {}
        return {
            "type": RECEIPT_TYPE,
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
            "job": {"id": job.id, "finished_at": iso(job.finished_at)},
            "source_version": {"id": source.id, "number": source.number, "sha256": source.sha256},
            "result_version": {"id": result.id, "number": result.number, "sha256": result.sha256},
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
