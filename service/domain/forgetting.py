"""Marking records forgotten, shared by the worker's save step and promotion of a candidate.

A record becomes `forgotten` exactly when a version without it becomes active, in the same
transaction, with a `records.forgotten` audit event carrying the sha256 of each key (never
the key or the content). Purging the content follows (service.trust.purge).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.domain.states import RecordState
from service.storage.sql import affected_rows, chunked
from service.storage.tables import Record
from service.trust.audit import append_event
from service.trust.purge import key_sha256


def mark_forgotten(
    session: Session, dataset_id: str, keys: Sequence[str], job_id: str, now: datetime
) -> int:
    """Mark the still-present records among `keys` forgotten; how many were marked."""
    forgotten = 0
    for chunk in chunked(list(keys)):
        forgotten += affected_rows(
            session,
            update(Record)
            .where(
                Record.dataset_id == dataset_id,
                Record.key.in_(chunk),
                Record.state == "present",
            )
            .values(state=RecordState.FORGOTTEN, forgotten_at=now, forgotten_by_job_id=job_id)
            .execution_options(synchronize_session=False),
        )
    return forgotten


def append_forgotten_event(
    session: Session,
    *,
    actor: str,
    dataset_id: str,
    job_id: str,
    request_id: str,
    keys: Sequence[str],
    count: int,
    served: Sequence[tuple[str, str]] = (),
) -> None:
    """``served``: (job id, request id) of every request a coalesced run answered."""
    payload = {
        "job_id": job_id,
        "request_id": request_id,
        "count": count,
        "key_sha256": [key_sha256(k) for k in list(keys)[:10000]],
    }
    if served:
        payload["job_ids"] = [j for j, _ in served]
        payload["request_ids"] = [r for _, r in served]
    append_event(
        session,
        actor=actor,
        action="records.forgotten",
        subject_type="dataset",
        subject_id=dataset_id,
        payload=payload,
    )
