"""Signed checkpoints of the audit chain head, kept outside the database.

A checkpoint is a JWS (see service.trust.signing) over `{type, seq, hash, time, kid}` stored in
object storage at `audit/checkpoints/<seq>.jws`, write-once. Someone who can rewrite the
database but not the object store or the key can no longer delete the last events, rewind
the head or recompute the chain below a checkpoint without `audit verify` noticing.

Before signing, the events since the previous checkpoint are verified, so a tampered chain
is never blessed. Written whenever a receipt is issued and by the reaper every
`LETHE_CHECKPOINT_INTERVAL_S`.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.storage.objects import Storage
from service.storage.tables import AuditHead, utcnow
from service.trust.audit import GENESIS_HASH, HEAD_ID, format_time, verify_chain
from service.trust.signing import SignatureError, Signer, verify_compact

log = logging.getLogger("lethe.audit")

PREFIX = "audit/checkpoints/"
TYPE = "https://lethe.dev/audit-checkpoint/v1"
TYP = "lethe-audit-checkpoint+jws"
AUDIENCE = "urn:lethe:audit-checkpoint"  # a receipt verifier asking for its own refuses this


class CheckpointError(RuntimeError):
    """The chain since the last checkpoint does not verify: nothing was signed."""


def _key(seq: int) -> str:
    return f"{PREFIX}{seq:012d}.jws"


def load_checkpoints(
    storage: Storage, jwks: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every stored checkpoint that verifies (oldest first), and a problem per one that not."""
    good: list[dict[str, Any]] = []
    problems: list[str] = []
    for key in storage.iter_keys(PREFIX):
        if not key.endswith(".jws"):
            continue
        with storage.open_read(key) as fh:
            token = fh.read().decode("ascii", "replace").strip()
        try:
            _, payload = verify_compact(token, jwks, TYP)
            if payload.get("type") != TYPE or _key(int(payload["seq"])) != key:
                raise SignatureError("payload does not match its name")
        except (SignatureError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"checkpoint {key}: {exc}")
            continue
        good.append({**payload, "jws": token})
    good.sort(key=lambda c: c["seq"])
    return good, problems


def latest_checkpoint(storage: Storage, jwks: dict[str, Any]) -> dict[str, Any] | None:
    """The newest checkpoint whose signature verifies (names sort by seq)."""
    for key in sorted((k for k in storage.iter_keys(PREFIX) if k.endswith(".jws")), reverse=True):
        with storage.open_read(key) as fh:
            token = fh.read().decode("ascii", "replace").strip()
        try:
            _, payload = verify_compact(token, jwks, TYP)
        except SignatureError as exc:
            log.error("checkpoint %s does not verify: %s", key, exc)
            continue
        if payload.get("type") == TYPE and _key(int(payload.get("seq", -1))) == key:
            return {**payload, "jws": token}
    return None


def write_checkpoint(
    factory: sessionmaker[Session], storage: Storage, signer: Signer
) -> dict[str, Any] | None:
    """Sign the current head (None while the log is empty); idempotent per seq."""
    last = latest_checkpoint(storage, signer.jwks())
    with factory() as session:
        head = session.get(AuditHead, HEAD_ID)
        if head is None or head.seq == 0:
            return None
        start = (last["seq"], last["hash"]) if last else (0, GENESIS_HASH)
        if last and (
            last["seq"] > head.seq or (last["seq"] == head.seq and last["hash"] != head.hash)
        ):
            raise CheckpointError(
                f"the audit head (seq {head.seq}) is behind or differs from the signed "
                f"checkpoint at seq {last['seq']}"
            )
        if last and last["seq"] == head.seq:
            return last
        result = verify_chain(session, start=start)
        if not result["ok"]:
            raise CheckpointError(
                f"audit chain broken at seq {result['first_bad_seq']}: {result['reason']}"
            )
        seq, digest = head.seq, head.hash
        if result["head_hash"] != digest:  # the head moved while verifying: sign what we saw
            return last
    payload = {
        "type": TYPE,
        "aud": AUDIENCE,
        "seq": seq,
        "hash": digest,
        "time": format_time(utcnow()),
        "kid": signer.kid,
    }
    token = signer.sign(payload, TYP)
    key = _key(seq)
    if not storage.exists(key):  # write-once: never replace what was signed before
        storage.write_bytes(key, token.encode("ascii"))
    return {**payload, "jws": token}


def verify_with_checkpoints(
    session: Session, storage: Storage, jwks: dict[str, Any]
) -> dict[str, Any]:
    """`verify_chain` against every signed checkpoint; adds `checkpoints` and `latest`."""
    checkpoints, problems = load_checkpoints(storage, jwks)
    result = verify_chain(session, checkpoints={c["seq"]: c["hash"] for c in checkpoints})
    if problems and result["ok"]:
        result.update(ok=False, reason="; ".join(problems[:5]))
    latest = checkpoints[-1] if checkpoints else None
    result["checkpoints"] = len(checkpoints)
    result["latest_checkpoint"] = (
        {k: latest[k] for k in ("seq", "hash", "time", "kid")} if latest else None
    )
    return result
