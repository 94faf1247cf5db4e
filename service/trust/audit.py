"""Append-only, hash-chained audit log.

Each event's hash covers its content and the previous event's hash, so editing, deleting or
reordering any event breaks every later link. Appends lock the single `audit_head` row, which
serialises them: sequence numbers have no gaps and two writers never fork the chain.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any, cast

from sqlalchemy import Row, Table, insert, select, update
from sqlalchemy.orm import Session

from service.engine import canonical_json
from service.storage.tables import AuditEvent, AuditHead, ModelVersion, utcnow

GENESIS_HASH = "0" * 64
HEAD_ID = 1
_HEAD = cast(Table, AuditHead.__table__)
_EVENTS = cast(Table, AuditEvent.__table__)


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
    """sha256 of the event's canonical JSON document (its fields and ``prev_hash``)."""
    return _chain_hash(
        seq,
        format_time(time),
        actor,
        action,
        subject_type,
        subject_id,
        canonical_json(payload),
        prev_hash,
    )


def _chain_hash(
    seq: int,
    time: str,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    payload_json: str,
    prev_hash: str,
) -> str:
    """`event_hash` with the payload already in canonical JSON: the document's text is
    ``canonical_json`` of the event's fields (keys in sorted order), built around that text
    so that a batch of appends dumps each payload once."""
    text = encode_basestring
    document = (
        f'{{"action":{text(action)},"actor":{text(actor)},"payload":{payload_json},'
        f'"prev_hash":{text(prev_hash)},"seq":{int(seq)},"subject_id":{text(subject_id)},'
        f'"subject_type":{text(subject_type)},"time":{text(time)}}}'
    )
    return hashlib.sha256(document.encode("utf-8")).hexdigest()


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


def _locked_head(session: Session) -> tuple[int, str]:
    """(seq, hash) of the chain head, its row locked until commit. FOR UPDATE is a no-op on
    SQLite, where BEGIN IMMEDIATE already serialises writers."""
    head = session.execute(
        select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == HEAD_ID).with_for_update()
    ).first()
    if head is None:  # databases made with metadata.create_all instead of the migration
        session.execute(insert(_HEAD).values(id=HEAD_ID, seq=0, hash=GENESIS_HASH))
        return 0, GENESIS_HASH
    return int(head.seq), str(head.hash)


def append_event(
    session: Session,
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    payload: dict[str, Any] | None = None,
) -> None:
    """Append one event inside the caller's transaction (it commits with the state change)."""
    append_events(
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
    )


def append_version_event(
    session: Session, version: ModelVersion, *, actor: str, action: str, **payload: Any
) -> None:
    """A version's event: every one names its model, number and checkpoint sha256."""
    identity = {"model_id": version.model_id, "number": version.number, "sha256": version.sha256}
    append_event(
        session,
        actor=actor,
        action=action,
        subject_type="model_version",
        subject_id=version.id,
        payload=identity | payload,
    )


def append_events(session: Session, events: list[dict[str, Any]]) -> None:
    """Append events (keyword sets of `append_event`) in order, locking the head once: a run
    that serves hundreds of requests writes their events in one step. Core statements: the
    head is locked from here to the commit, so this step is kept short."""
    if not events:
        return
    # Truncate to microseconds: both SQLite and PostgreSQL store that precision.
    now = utcnow().replace(tzinfo=UTC)
    when = format_time(now)
    # Dumped before the lock. What is hashed is this canonical text, which is also what the
    # stored payload dumps to when it is read back (verify_chain recomputes it from there).
    payloads = [(event.get("payload") or {}) for event in events]
    texts = [canonical_json(payload) for payload in payloads]
    seq, prev = _locked_head(session)
    rows = []
    for event, payload, payload_json in zip(events, payloads, texts, strict=True):
        seq += 1
        row = {
            "seq": seq,
            "time": now,
            "actor": event["actor"],
            "action": event["action"],
            "subject_type": event["subject_type"],
            "subject_id": str(event["subject_id"]),
            "payload": payload,
            "prev_hash": prev,
        }
        prev = row["hash"] = _chain_hash(
            seq,
            when,
            row["actor"],
            row["action"],
            row["subject_type"],
            row["subject_id"],
            payload_json,
            prev,
        )
        rows.append(row)
    session.execute(insert(_EVENTS), rows)
    session.execute(update(_HEAD).where(_HEAD.c.id == HEAD_ID).values(seq=seq, hash=prev))


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
