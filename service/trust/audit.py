"""Append-only, hash-chained audit log.

Each event's hash covers its content and the previous event's hash, so editing, deleting or
reordering any event breaks every later link. Appends lock the single `audit_head` row, which
serialises them: sequence numbers have no gaps and two writers never fork the chain.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from service.engine import canonical_json
from service.storage.sql import insert_rows
from service.storage.tables import AuditEvent, AuditHead, ModelVersion, utcnow

GENESIS_HASH = "0" * 64
HEAD_ID = 1


def format_time(value: datetime) -> str:
    """ISO-8601 UTC with microseconds (columns read back aware: storage.tables.UTCDateTime)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(
    *,
    seq: int,
    time: datetime,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    payload: dict[str, Any],
    prev_hash: str,
) -> str:
    document = {
        "seq": seq,
        "time": format_time(time),
        "actor": actor,
        "action": action,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "payload": payload,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()


def stored_event_hash(event: AuditEvent | Row[Any], prev_hash: str) -> str:
    """The chain hash of a stored event (ORM row or selected columns), chained to ``prev_hash``."""
    return event_hash(
        seq=event.seq,
        time=event.time,
        actor=event.actor,
        action=event.action,
        subject_type=event.subject_type,
        subject_id=event.subject_id,
        payload=event.payload,
        prev_hash=prev_hash,
    )


def _locked_head(session: Session) -> AuditHead:
    # FOR UPDATE is a no-op on SQLite, where BEGIN IMMEDIATE already serialises writers.
    head = session.execute(
        select(AuditHead)
        .where(AuditHead.id == HEAD_ID)
        .with_for_update()
        # Re-read the row even if this session saw it before: another writer moved it since.
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if head is None:  # databases made with metadata.create_all instead of the migration
        head = AuditHead(id=HEAD_ID, seq=0, hash=GENESIS_HASH)
        session.add(head)
        session.flush()
    return head


def append_event(
    session: Session,
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    payload: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event inside the caller's transaction (it commits with the state change)."""
    return append_events(
        session,
        [
            {
                "actor": actor,
                "action": action,
                "subject_type": subject_type,
                "subject_id": subject_id,
                "payload": payload,
            }
        ],
    )[0]


def append_version_event(
    session: Session, version: ModelVersion, *, actor: str, action: str, **payload: Any
) -> AuditEvent:
    """A version's event: every one names its model, number and checkpoint sha256."""
    identity = {"model_id": version.model_id, "number": version.number, "sha256": version.sha256}
    return append_event(
        session,
        actor=actor,
        action=action,
        subject_type="model_version",
        subject_id=version.id,
        payload=identity | payload,
    )


def append_events(session: Session, events: list[dict[str, Any]]) -> list[AuditEvent]:
    """Append events (keyword sets of `append_event`) in order, locking the head once: a run
    that serves hundreds of requests writes their events in one step."""
    if not events:
        return []
    head = _locked_head(session)
    # Truncate to microseconds: both SQLite and PostgreSQL store that precision.
    now = utcnow().replace(tzinfo=UTC)
    seq, prev = head.seq, head.hash
    out = []
    for event in events:
        seq += 1
        fields: dict[str, Any] = {
            "seq": seq,
            "time": now,
            "actor": event["actor"],
            "action": event["action"],
            "subject_type": event["subject_type"],
            "subject_id": str(event["subject_id"]),
            # Round-trip through JSON so what is hashed is what the JSON column gives back.
            "payload": json.loads(canonical_json(event.get("payload") or {})),
            "prev_hash": prev,
        }
        prev = event_hash(**fields)
        out.append(AuditEvent(**fields, hash=prev))
    insert_rows(session, out)
    head.seq, head.hash = seq, prev
    session.flush()
    return out


def event_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "time": format_time(event.time),
        "actor": event.actor,
        "action": event.action,
        "subject_type": event.subject_type,
        "subject_id": event.subject_id,
        "payload": event.payload,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


# Plain column tuples, not ORM objects: verifying a long chain keeps nothing in the session.
_EVENT_COLUMNS = (
    AuditEvent.seq,
    AuditEvent.time,
    AuditEvent.actor,
    AuditEvent.action,
    AuditEvent.subject_type,
    AuditEvent.subject_id,
    AuditEvent.payload,
    AuditEvent.prev_hash,
    AuditEvent.hash,
)


def verify_chain(
    session: Session,
    batch: int = 1000,
    *,
    checkpoints: dict[int, str] | None = None,
    start: tuple[int, str] = (0, GENESIS_HASH),
) -> dict[str, Any]:
    """Recompute every link from `start` (seq, hash) on; report the first bad sequence
    number (gaps and head included). `checkpoints` maps seq -> hash signed outside the
    database: a chain that differs at one of them, or ends before the latest, fails."""
    checkpoints = checkpoints or {}
    expected_seq = start[0] + 1
    prev_hash = start[1]
    checked = 0
    last_seq = start[0]
    while True:
        rows = session.execute(
            select(*_EVENT_COLUMNS)
            .where(AuditEvent.seq >= expected_seq)
            .order_by(AuditEvent.seq)
            .limit(batch)
        ).all()
        if not rows:
            break
        for event in rows:
            reason = None
            if event.seq != expected_seq:
                reason = f"sequence gap: expected {expected_seq}, found {event.seq}"
                bad_seq = expected_seq
            elif event.prev_hash != prev_hash:
                reason = "prev_hash does not match the previous event's hash"
                bad_seq = event.seq
            else:
                recomputed = stored_event_hash(event, event.prev_hash)
                if recomputed != event.hash:
                    reason = "content does not match its hash"
                    bad_seq = event.seq
                elif checkpoints.get(event.seq, event.hash) != event.hash:
                    # Internally consistent but not the chain that was signed: recomputed.
                    reason = (
                        "hash differs from the signed checkpoint at this seq: the chain "
                        "up to here was rewritten"
                    )
                    bad_seq = event.seq
            if reason is not None:
                return _result(False, checked, prev_hash, bad_seq, reason)
            checked += 1
            prev_hash = event.hash
            last_seq = event.seq
            expected_seq += 1
    signed_max = max(checkpoints, default=0)
    if signed_max > last_seq:
        return _result(
            False,
            checked,
            prev_hash,
            last_seq + 1,
            f"the chain ends at seq {last_seq} but a signed checkpoint records seq "
            f"{signed_max}: events were deleted",
        )
    head = session.get(AuditHead, HEAD_ID)
    head_seq = head.seq if head else 0
    head_hash = head.hash if head else GENESIS_HASH
    if head_seq != last_seq or head_hash != prev_hash:
        # Events past the last one were deleted, or the head row was rewritten.
        return _result(
            False,
            checked,
            head_hash,
            last_seq + 1,
            f"head (seq {head_seq}) does not match the last event (seq {last_seq})",
        )
    return _result(True, checked, head_hash, None, None)


def _result(
    ok: bool, checked: int, head_hash: str, first_bad_seq: int | None, reason: str | None
) -> dict[str, Any]:
    return {
        "ok": ok,
        "checked": checked,
        "head_hash": head_hash,
        "first_bad_seq": first_bad_seq,
        "reason": reason,
    }
