"""Which records a deletion request may name, and the holds that keep two queued requests
from naming the same record (``records.held_by_request_id``, migration 0003).

Submissions read the records without a lock and write their holds later, under the dataset's
lock, on the condition that each record is still as it was read (`hold_all`, a compare-and-
set): a hold or a forgetting committed by another process in between is caught there."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from service.domain.states import ACTIVE_REQUEST_STATES, RecordState, RequestStatus
from service.errors import Invalid, validation
from service.storage.group_commit import batch_memo
from service.storage.sql import affected_rows, chunked
from service.storage.tables import Dataset, DeletionRequest, Record


def lock_datasets(session: Session, dataset_ids: Iterable[str]) -> None:
    """Submissions naming one dataset's records (perhaps for several models) write their holds
    under its row lock; in id order, so two batches that lock several never deadlock. FOR NO
    KEY UPDATE: it must not wait for the key-share locks that inserting a request (a foreign
    key to the dataset) takes, or two batches that each inserted one would wait on each other."""
    memo = batch_memo(session).setdefault("locked_datasets", set())
    for dataset_id in sorted(set(dataset_ids) - memo):
        session.execute(
            select(Dataset.id).where(Dataset.id == dataset_id).with_for_update(key_share=True)
        )
        memo.add(dataset_id)


def _held(
    session: Session, keys: list[str], holders: dict[str, str]
) -> tuple[list[str], list[str]]:
    """(keys named by a queued or running request, keys named by one awaiting review).

    One primary-key lookup per distinct holder, remembered for the rest of the batch: the
    cost does not grow with the backlog."""
    status: dict[str, str] = batch_memo(session).setdefault("request_status", {})
    ids = sorted({holders[k] for k in keys if k in holders} - status.keys())
    for chunk in chunked(ids):
        status.update(
            session.execute(
                select(DeletionRequest.id, DeletionRequest.status).where(
                    DeletionRequest.id.in_(chunk)
                )
            ).all()
        )
    # A candidate awaiting review still holds its records (they are forgotten on promotion):
    # naming them again meanwhile would make two versions race to forget the same records.
    pending = [k for k in keys if status.get(holders.get(k, "")) in ACTIVE_REQUEST_STATES]
    in_review = [k for k in keys if status.get(holders.get(k, "")) == RequestStatus.NEEDS_REVIEW]
    return pending, in_review


# Keys read for the batch's later submissions in the first one's statement, at most.
BATCH_READ_MAX = 10_000


def _record_rows(
    session: Session, dataset_id: str, keys: list[str], also: Iterable[str]
) -> dict[str, tuple[str, str | None] | None]:
    """(state, holder) of each key, None where the dataset lacks it. Keys read once stay read
    for the batch (``batch_memo``: forgotten when a savepoint rolls back); ``also``, the keys
    the batch's later submissions will ask for, are read in the same statement."""
    rows: dict[str, tuple[str, str | None] | None] = batch_memo(session).setdefault(
        ("records", dataset_id), {}
    )
    wanted = [k for k in keys if k not in rows]
    if wanted:
        extra: list[str] = []
        for key in also:
            if key not in rows:
                extra.append(key)
                if len(wanted) + len(extra) > BATCH_READ_MAX:  # too many: this unit's alone
                    extra = []
                    break
        wanted = list(dict.fromkeys(wanted + extra))
        for chunk in chunked(wanted):
            for key, state, holder in session.execute(
                select(Record.key, Record.state, Record.held_by_request_id).where(
                    Record.dataset_id == dataset_id, Record.key.in_(chunk)
                )
            ):
                rows[key] = (state, holder)
        for key in wanted:
            rows.setdefault(key, None)
    return {k: rows[k] for k in keys}


# What a submission read of each of its records: (state, holder).
Seen = Mapping[str, tuple[str, str | None]]
# A request naming more keys than this is held with IN lists, one UPDATE per distinct holder
# read; smaller ones share one executemany (one pipelined round trip on PostgreSQL for a whole
# batch of submissions).
_SHARED_HOLD_MAX = 64


def hold_all(session: Session, holds: list[tuple[str, list[str], str, Seen]]) -> bool:
    """Hold each request's records, (dataset id, keys, request id, what was read) each, where
    a record's holder is still the one read. False when some record's is not: another process
    held it since (the caller rolls back and reads again). The holder is enough to compare: a
    record is forgotten only by the request that holds it (service.domain.activation), and a
    key whose holder is active was refused. The state stays out of the WHERE clause: with it,
    PostgreSQL's generic plan scanned the (dataset, state) index instead of the unique key."""
    table = cast(Table, Record.__table__)  # Core: executemany binds per row
    where = (
        table.c.dataset_id == bindparam("ds"),
        table.c.held_by_request_id.is_not_distinct_from(bindparam("was")),
    )
    expected = matched = 0
    shared = []
    for dataset_id, keys, request_id, seen in holds:
        expected += len(keys)
        if len(keys) <= _SHARED_HOLD_MAX:
            shared += [
                {"ds": dataset_id, "k": k, "was": seen[k][1], "rid": request_id} for k in keys
            ]
            continue
        alike: dict[str | None, list[str]] = {}
        for key in keys:
            alike.setdefault(seen[key][1], []).append(key)
        for was, group in alike.items():
            for chunk in chunked(group):
                matched += affected_rows(
                    session,
                    update(table)
                    .where(*where, table.c.key.in_(chunk))
                    .values(held_by_request_id=request_id),
                    {"ds": dataset_id, "was": was},
                )
    if shared:
        matched += affected_rows(
            session,
            update(table)
            .where(*where, table.c.key == bindparam("k"))
            .values(held_by_request_id=bindparam("rid")),
            shared,
        )
    return matched == expected


def check_keys(
    session: Session,
    dataset_id: str,
    keys: list[str],
    batch_held: Mapping[str, str] = {},
    also: Iterable[str] = (),
) -> Seen:
    """Refuse keys that are missing, forgotten or held, naming each (422); else what was read
    of each (for `hold_all`). ``batch_held``: keys held by submissions of the same batch whose
    holds are not written yet; ``also``: keys the batch's other submissions name (read now, in
    the same statement)."""
    seen: set[str] = set()
    dupes = sorted({k for k in keys if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
    if dupes:
        raise validation(
            f"record_keys contains duplicates: {dupes[:10]}",
            [{"field": "record_keys", "message": "duplicate", "keys": dupes[:1000]}],
        )
    states: dict[str, str] = {}
    holders: dict[str, str] = {}
    rows = _record_rows(session, dataset_id, keys, also)
    for key, row in rows.items():
        if row is not None:
            states[key] = row[0]
            if row[1] is not None and row[0] != RecordState.FORGOTTEN:
                holders[key] = row[1]
    missing = [k for k in keys if k not in states]
    forgotten = [k for k in keys if states.get(k) == RecordState.FORGOTTEN]
    # Holders are looked up by id: decoding every queued request's key list made each POST
    # slower as the backlog grew.
    pending, in_review = _held(session, keys, holders)
    pending += [k for k in keys if k in batch_held and k not in pending]
    errors = (
        [{"field": "record_keys", "key": k, "message": "not in the dataset"} for k in missing]
        + [{"field": "record_keys", "key": k, "message": "already forgotten"} for k in forgotten]
        + [
            {"field": "record_keys", "key": k, "message": "named by a queued or running request"}
            for k in pending
        ]
        + [
            {"field": "record_keys", "key": k, "message": "named by a request awaiting review"}
            for k in in_review
        ]
    )
    if errors:
        parts = []
        if missing:
            parts.append(f"{len(missing)} not in the dataset ({', '.join(missing[:10])})")
        if forgotten:
            parts.append(f"{len(forgotten)} already forgotten ({', '.join(forgotten[:10])})")
        if pending:
            parts.append(
                f"{len(pending)} named by a queued or running request ({', '.join(pending[:10])})"
            )
        if in_review:
            parts.append(
                f"{len(in_review)} named by a request awaiting review ({', '.join(in_review[:10])})"
            )
        raise Invalid(
            "invalid-record-keys",
            "record keys refused: " + "; ".join(parts),
            title="Invalid record keys",
            errors=errors[:1000],
            missing=missing[:1000],
            forgotten=forgotten[:1000],
            pending=pending[:1000],
            in_review=in_review[:1000],
        )
    return cast(Seen, rows)  # every key was found (a missing one is refused above)


__all__ = ["Seen", "check_keys", "hold_all", "lock_datasets"]
