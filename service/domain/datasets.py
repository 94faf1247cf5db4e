"""Dataset registration and queries.

An upload is streamed into storage under a server-generated key while it is hashed, then
parsed from storage and validated; only a fully valid file produces database rows (dataset,
one row per record, audit event) in one transaction. Any failure deletes the stored file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from service.domain.pagination import MAX_LIMIT, decode_cursor, page
from service.domain.states import DATASET_KINDS, DATASET_ROLES, RecordState
from service.domain.views import dataset_view, iso
from service.errors import Invalid, PayloadTooLarge, did_you_mean, not_found, validation
from service.ingest.datasets_io import DatasetError, dataset_meta, load_dataset, record_hashes
from service.ingest.npzread import NpzLimits
from service.storage.db import transaction
from service.storage.objects import Storage, TooLarge
from service.storage.tables import Dataset, Record, new_id
from service.trust.audit import append_event

EXTENSIONS = {"tensor": "npz", "text": "jsonl"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._\-]{0,199}$")
_INSERT_BATCH = 5000


def check_name(name: str, what: str = "name") -> str:
    """Names are labels, never paths; refuse anything path-like to keep them unambiguous."""
    if not NAME_RE.match(name or "") or ".." in name:
        raise validation(
            f"invalid {what} {name!r}: start with a letter or digit, then letters, digits, "
            "spaces, '.', '_' or '-' (no '..', no slashes), at most 200 characters",
            [{"field": what, "message": "invalid name"}],
        )
    return name


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        "payload-too-large",
        f"the upload exceeds the limit of {limit // (1024 * 1024)} MiB (LETHE_MAX_UPLOAD_MB)",
        title="Payload too large",
    )


def register_dataset(
    factory: sessionmaker[Session],
    storage: Storage,
    *,
    name: str,
    kind: str,
    role: str,
    chunks: Iterable[bytes],
    max_bytes: int | None,
    actor: str,
    limits: NpzLimits | None = None,
) -> dict[str, Any]:
    check_name(name)
    errors = []
    if kind not in DATASET_KINDS:
        errors.append({"field": "kind", "message": f"must be one of {', '.join(DATASET_KINDS)}"})
    if role not in DATASET_ROLES:
        errors.append({"field": "role", "message": f"must be one of {', '.join(DATASET_ROLES)}"})
    if errors:
        raise validation("invalid dataset fields: " + ", ".join(e["field"] for e in errors), errors)

    dataset_id = new_id()
    key = f"datasets/{dataset_id}.{EXTENSIONS[kind]}"
    try:
        sha, size = storage.write_stream(key, chunks, max_bytes=max_bytes)
    except TooLarge as exc:
        raise too_large(exc.limit) from None
    try:
        if size == 0:
            raise DatasetError("the uploaded file is empty")
        with storage.open_read(key) as fh:
            data = load_dataset(kind, fh, limits)
        hashes = record_hashes(data)
        with transaction(factory) as session:
            ds = Dataset(
                id=dataset_id,
                name=name,
                kind=kind,
                role=role,
                record_count=len(data.ids),
                sha256=sha,
                size_bytes=size,
                storage_key=key,
                content_sha256=sha,
                meta=dataset_meta(data),
            )
            session.add(ds)
            session.flush()
            rows = [
                {
                    "dataset_id": dataset_id,
                    "key": k,
                    "row": i,
                    "content_sha256": h,
                    "state": "present",
                }
                for i, (k, h) in enumerate(zip(data.ids, hashes, strict=True))
            ]
            for start in range(0, len(rows), _INSERT_BATCH):
                session.execute(insert(Record), rows[start : start + _INSERT_BATCH])
            append_event(
                session,
                actor=actor,
                action="dataset.registered",
                subject_type="dataset",
                subject_id=dataset_id,
                payload={
                    "name": name,
                    "kind": kind,
                    "role": role,
                    "sha256": sha,
                    "size_bytes": size,
                    "record_count": len(data.ids),
                },
            )
            view = dataset_view(ds)
    except DatasetError as exc:
        storage.delete(key)
        raise Invalid(
            "invalid-dataset", str(exc), title="Invalid dataset file", errors=exc.errors
        ) from None
    except BaseException:
        storage.delete(key)
        raise
    return view


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    ds = session.get(Dataset, dataset_id)
    if ds is None:
        raise not_found("dataset", dataset_id)
    return ds


def resolve_dataset(session: Session, ref: str, field: str = "dataset") -> Dataset:
    """A dataset named by id, or by name when that name is unique."""
    ds = session.get(Dataset, ref)
    if ds is not None:
        return ds
    matches = session.execute(select(Dataset).where(Dataset.name == ref).limit(2)).scalars().all()
    if len(matches) == 1:
        return matches[0]
    message = "ambiguous name; use the id" if matches else "no such dataset"
    if not matches:
        names = session.execute(select(Dataset.name).limit(10_000)).scalars().all()
        message += did_you_mean(ref, names)[1]
    raise validation(f"{field} {ref!r}: {message}", [{"field": field, "message": message}])


def show_dataset(factory: sessionmaker[Session], dataset_id: str) -> dict[str, Any]:
    with factory() as session:
        ds = get_dataset(session, dataset_id)
        counts = dict(
            session.execute(
                select(Record.state, func.count())
                .where(Record.dataset_id == ds.id)
                .group_by(Record.state)
            ).all()
        )
        view = dataset_view(ds)
        view["state_counts"] = {
            "present": counts.get("present", 0),
            "forgotten": counts.get(RecordState.FORGOTTEN, 0),
        }
        return view


def list_datasets(
    factory: sessionmaker[Session], *, role: str | None, cursor: str | None, limit: int
) -> dict[str, Any]:
    limit = min(limit, MAX_LIMIT)
    after = decode_cursor(cursor, 2)
    with factory() as session:
        q = select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id.desc())
        if role:
            q = q.where(Dataset.role == role)
        if after:
            q = q.where(
                (Dataset.created_at < _dt(after[0]))
                | ((Dataset.created_at == _dt(after[0])) & (Dataset.id < after[1]))
            )
        rows = list(session.execute(q.limit(limit + 1)).scalars())
        items, next_cursor = page(rows, limit, lambda d: [_raw_iso(d.created_at), d.id])
        return {"items": [dataset_view(d) for d in items], "next_cursor": next_cursor}


def list_records(
    factory: sessionmaker[Session],
    dataset_id: str,
    *,
    state: str | None,
    cursor: str | None,
    limit: int,
) -> dict[str, Any]:
    if state is not None and state not in tuple(RecordState):
        raise validation(
            "state must be present or forgotten", [{"field": "state", "message": "invalid"}]
        )
    limit = min(limit, MAX_LIMIT)
    after = decode_cursor(cursor, 1)
    with factory() as session:
        get_dataset(session, dataset_id)
        q = select(Record).where(Record.dataset_id == dataset_id).order_by(Record.row)
        if state:
            q = q.where(Record.state == state)
        if after:
            q = q.where(Record.row > int(after[0]))
        rows = list(session.execute(q.limit(limit + 1)).scalars())
        items, next_cursor = page(rows, limit, lambda r: [r.row])
        return {
            "items": [
                {
                    "key": r.key,
                    "row": r.row,
                    "state": r.state,
                    "sha256": r.content_sha256,
                    "forgotten_at": iso(r.forgotten_at),
                    "purged_at": iso(r.purged_at),
                }
                for r in items
            ],
            "next_cursor": next_cursor,
        }


def _raw_iso(value: Any) -> str:
    return value.isoformat()


def _dt(value: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value)
