"""Which records a deletion request may name, and the holds that keep two queued requests
from naming the same record (``records.held_by_request_id``, migration 0003)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from service.domain.datasets import resolve_dataset
from service.domain.states import ACTIVE_REQUEST_STATES, RecordState, RequestStatus
from service.errors import Invalid, validation
from service.storage.group_commit import batch_memo
from service.storage.sql import chunked
from service.storage.tables import Dataset, DeletionRequest, Record


def lock_dataset(session: Session, dataset_id: str) -> None:
    """Submissions naming one dataset's records (perhaps for several models) serialise here."""
    session.execute(select(Dataset.id).where(Dataset.id == dataset_id).with_for_update())


def resolve_and_lock_dataset(session: Session, ref: str) -> Dataset:
    """`resolve_dataset`, then `lock_dataset`: one statement when ``ref`` is an id."""
    ds = session.execute(
        select(Dataset).where(Dataset.id == ref).with_for_update()
    ).scalar_one_or_none()
    if ds is None:
        ds = resolve_dataset(session, ref)
        lock_dataset(session, ds.id)
    return ds


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


def hold(session: Session, dataset_id: str, keys: list[str], request_id: str) -> None:
    for chunk in chunked(keys):
        session.execute(
            update(Record)
            .where(Record.dataset_id == dataset_id, Record.key.in_(chunk))
            .values(held_by_request_id=request_id)
        )


# A request naming more keys than this is held with IN lists; smaller ones share one
# executemany (one pipelined round trip on PostgreSQL for a whole batch of submissions).
_SHARED_HOLD_MAX = 64


def hold_all(session: Session, holds: list[tuple[str, list[str], str]]) -> None:
    """``hold`` for many requests at once: (dataset id, keys, request id) each."""
    shared = []
    for dataset_id, keys, request_id in holds:
        if len(keys) > _SHARED_HOLD_MAX:
            hold(session, dataset_id, keys, request_id)
        else:
            shared += [{"ds": dataset_id, "k": k, "rid": request_id} for k in keys]
    if shared:
        table = cast(Table, Record.__table__)  # Core: executemany binds per row
        session.execute(
            update(table)
            .where(table.c.dataset_id == bindparam("ds"), table.c.key == bindparam("k"))
            .values(held_by_request_id=bindparam("rid")),
            shared,
        )


def check_keys(
    session: Session,
    dataset_id: str,
    keys: list[str],
    batch_held: Mapping[str, str] = {},
    also: Iterable[str] = (),
) -> None:
    """Refuse keys that are missing, forgotten or held, naming each (422). ``batch_held``:
    keys held by submissions of the same batch whose holds are not written yet; ``also``:
    keys the batch's other submissions name (read now, in the same statement)."""
    seen: set[str] = set()
    dupes = sorted({k for k in keys if k in seen or seen.add(k)})  # type: ignore[func-returns-value]
    if dupes:
        raise validation(
            f"record_keys contains duplicates: {dupes[:10]}",
            [{"field": "record_keys", "message": "duplicate", "keys": dupes[:1000]}],
        )
    states: dict[str, str] = {}
    holders: dict[str, str] = {}
    for key, row in _record_rows(session, dataset_id, keys, also).items():
        if row is not None:
            states[key] = row[0]
            if row[1] is not None and row[0] != RecordState.FORGOTTEN:
                holders[key] = row[1]
    missing = [k for k in keys if k not in states]
    forgotten = [k for k in keys if states.get(k) == RecordState.FORGOTTEN]
    # Match the submitted keys inside the database (the JSON arrays are expanded there): this
    # runs under the submission lock, and decoding every queued request's key list made each
    # POST slower as the backlog grew.
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


__all__ = ["check_keys", "hold", "hold_all", "lock_dataset", "resolve_and_lock_dataset"]
