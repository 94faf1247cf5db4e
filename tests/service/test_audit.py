"""Audit chain: appends link, verification catches edits, deletions, gaps and head changes."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import delete, select, update

from service.storage.db import transaction
from service.storage.tables import AuditEvent, AuditHead
from service.trust.audit import GENESIS_HASH, append_event, verify_chain


def _append(sessions, n: int) -> None:
    for i in range(n):
        with transaction(sessions) as s:
            append_event(
                s,
                actor="tester",
                action="thing.done",
                subject_type="thing",
                subject_id=f"t{i}",
                payload={"i": i, "name": "ünïcode", "nested": {"b": 1, "a": 2}},
            )


def test_chain_links_and_hash_formula(sessions) -> None:
    _append(sessions, 3)
    with sessions() as s:
        events = s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
        assert [e.seq for e in events] == [1, 2, 3]
        assert events[0].prev_hash == GENESIS_HASH
        assert events[1].prev_hash == events[0].hash and events[2].prev_hash == events[1].hash
        first = events[0]
        doc = {
            "seq": 1,
            "time": first.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "actor": "tester",
            "action": "thing.done",
            "subject_type": "thing",
            "subject_id": "t0",
            "payload": {"i": 0, "name": "ünïcode", "nested": {"b": 1, "a": 2}},
            "prev_hash": GENESIS_HASH,
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert hashlib.sha256(text.encode()).hexdigest() == first.hash
        result = verify_chain(s)
        assert result["ok"] is True and result["checked"] == 3
        assert result["head_hash"] == events[2].hash and result["first_bad_seq"] is None


def test_verify_detects_edit(sessions) -> None:
    _append(sessions, 4)
    with transaction(sessions) as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 2).values(payload={"i": 99}))
    with sessions() as s:
        result = verify_chain(s)
    assert result["ok"] is False and result["first_bad_seq"] == 2 and result["checked"] == 1


def test_verify_detects_gap_and_tail_deletion(sessions) -> None:
    _append(sessions, 5)
    with transaction(sessions) as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
    with sessions() as s:
        assert verify_chain(s)["first_bad_seq"] == 3
    with transaction(sessions) as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq >= 3))
    with sessions() as s:
        result = verify_chain(s)
    # Events 1-2 are intact, but the head still says 5: the tail was removed.
    assert result["ok"] is False and result["checked"] == 2 and result["first_bad_seq"] == 3


def test_verify_detects_head_rewrite(sessions) -> None:
    _append(sessions, 2)
    with transaction(sessions) as s:
        s.execute(update(AuditHead).values(hash="f" * 64))
    with sessions() as s:
        assert verify_chain(s)["ok"] is False


def test_empty_chain_is_valid(sessions) -> None:
    with sessions() as s:
        assert verify_chain(s) == {
            "ok": True,
            "checked": 0,
            "head_hash": GENESIS_HASH,
            "first_bad_seq": None,
            "reason": None,
        }
