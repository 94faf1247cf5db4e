"""Signed audit checkpoints in object storage: truncation with a rewound head, and a chain
recomputed below the latest checkpoint, both pass a plain hash-chain check (the hole the
checkpoints close) and both fail `audit verify` over HTTP and the CLI, on SQLite and
PostgreSQL. A forged checkpoint file is reported; a broken chain is never signed."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, select, update
from typer.testing import CliRunner

from service.cli import app
from service.storage.db import transaction
from service.storage.tables import AuditEvent, AuditHead
from service.trust.audit import HEAD_ID, append_event, stored_event_hash, verify_chain
from service.trust.audit_checkpoints import PREFIX, CheckpointError, write_checkpoint
from service.trust.signing import OKPKey, Signer, load_signer
from tests.trust.conftest import get
from tests.worker.harness import Stack
from worker.reaper import Reaper

cli = CliRunner()


def _events(stack: Stack, n: int) -> None:
    with transaction(stack.sessions) as session:
        for i in range(n):
            append_event(
                session,
                actor="test",
                action="test.event",
                subject_type="job",
                subject_id=f"j{i}",
                payload={"i": i},
            )


def _cli_verify(stack: Stack):
    s = stack.settings
    env = {
        "LETHE_HOME": str(s.home),
        "LETHE_DATABASE_URL": s.database_url,
        "LETHE_STORAGE_URL": s.storage_url,
    }
    return cli.invoke(app, ["audit", "verify"], env=env)


def _checkpoint_by_reaper(stack: Stack) -> int:
    report = Reaper(stack.settings, stack.sessions, stack_storage(stack), actor="reaper").tick()
    assert report.checkpoint_seq is not None
    return report.checkpoint_seq


def stack_storage(stack: Stack):
    from service.storage.objects import Storage

    return Storage.from_settings(stack.settings)


def _recompute_from(stack: Stack, seq: int) -> None:
    """The attacker with database access: edit event `seq`, rehash it and every later one,
    move the head. The chain is internally consistent again."""
    with transaction(stack.sessions) as session:
        rows = list(
            session.execute(
                select(AuditEvent).where(AuditEvent.seq >= seq).order_by(AuditEvent.seq)
            ).scalars()
        )
        prev = session.execute(
            select(AuditEvent.hash).where(AuditEvent.seq == seq - 1)
        ).scalar_one()
        for event in rows:
            if event.seq == seq:
                event.payload = {"i": -1, "edited": True}
            event.prev_hash = prev
            event.hash = stored_event_hash(event, prev)
            prev = event.hash
        session.flush()
        session.execute(update(AuditHead).where(AuditHead.id == HEAD_ID).values(hash=prev))


def _ok(stack: Stack) -> dict:
    with stack.sessions() as session:
        assert verify_chain(session)["ok"], "the plain chain check is fooled"
    result = get(stack, "/v1/audit/verify").json()
    return result


def test_truncation_with_rewound_head_is_detected(stack: Stack) -> None:
    _events(stack, 6)
    signed = _checkpoint_by_reaper(stack)
    assert get(stack, "/v1/audit/verify").json()["ok"] is True
    assert _cli_verify(stack).exit_code == 0
    # Delete the last three events and rewind the head onto the one before them.
    keep = signed - 3
    with transaction(stack.sessions) as session:
        session.execute(delete(AuditEvent).where(AuditEvent.seq > keep))
        kept_hash = session.execute(
            select(AuditEvent.hash).where(AuditEvent.seq == keep)
        ).scalar_one()
        session.execute(
            update(AuditHead).where(AuditHead.id == HEAD_ID).values(seq=keep, hash=kept_hash)
        )
    result = _ok(stack)
    assert result["ok"] is False and result["first_bad_seq"] == keep + 1
    assert "events were deleted" in result["reason"] and result["checkpoints"] >= 1
    out = _cli_verify(stack)
    assert out.exit_code == 1 and "events were deleted" in out.stdout
    # A broken chain is never blessed with a new checkpoint.
    _events(stack, 1)
    with pytest.raises(CheckpointError):
        write_checkpoint(stack.sessions, stack_storage(stack), load_signer(stack.settings))


def test_recomputed_chain_below_checkpoint_is_detected(stack: Stack) -> None:
    _events(stack, 8)
    signed = _checkpoint_by_reaper(stack)
    _events(stack, 2)  # later events, not yet checkpointed
    _recompute_from(stack, signed - 4)
    result = _ok(stack)
    # Detected at the checkpoint: the first seq whose signed hash the rewrite changed.
    assert result["ok"] is False and result["first_bad_seq"] == signed, result
    assert "signed checkpoint" in result["reason"]
    assert _cli_verify(stack).exit_code == 1


def test_recomputing_after_the_last_checkpoint_only_and_forged_checkpoints(
    stack: Stack,
) -> None:
    _events(stack, 4)
    signed = _checkpoint_by_reaper(stack)
    _events(stack, 3)
    storage = stack_storage(stack)
    # A checkpoint signed by a key the service does not hold is reported, not trusted.
    impostor = Signer(OKPKey.generate_key("Ed25519"))
    with stack.sessions() as session:
        head = session.get(AuditHead, HEAD_ID)
        payload = {
            "type": "https://lethe.dev/audit-checkpoint/v1",
            "seq": head.seq,
            "hash": head.hash,
            "time": "2026-01-01T00:00:00.000000Z",
            "kid": impostor.kid,
        }
    storage.write_bytes(
        f"{PREFIX}{head.seq:012d}.jws",
        impostor.sign(payload, "lethe-audit-checkpoint+jws").encode(),
    )
    result = get(stack, "/v1/audit/verify").json()
    assert result["ok"] is False and "does not hold" in result["reason"]
    assert result["latest_checkpoint"]["seq"] == signed
    storage.delete(f"{PREFIX}{head.seq:012d}.jws")
    assert get(stack, "/v1/audit/verify").json()["ok"] is True
