"""Purge: forgotten records' content leaves the dataset store; key, sha256 and times remain.

Once a version without some records is active, those records are `forgotten`; this step then
rewrites the dataset file without them:

1. one transaction locks the dataset row (so two purges, or a purge and a sweep, never
   interleave), reads the current file, writes the rewritten file under a fresh key
   (`datasets/<dataset id>-<hex>.<ext>`, written to a temp name and renamed), points
   `Dataset.storage_key`/`content_sha256` at it, stamps `Record.purged_at` and appends a
   `content.purged` event;
2. after the commit, every other file of the dataset (`datasets/<dataset id>*`: the file as
   uploaded, earlier rewrites, leftovers of a crash) is deleted, again under the row lock.

The step is idempotent and keyed on the database (`state = forgotten AND purged_at IS
NULL`), so whoever runs it next finishes an interrupted purge: the worker right after its
save, promotion (service.domain.activation), and the worker's reaper on every tick.

Rows are addressed by key, never by position: the worker loads records through the ids in
the current file, so `Record.row` stays the row in the file as uploaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.domain.states import RecordState
from service.ingest.datasets_io import TensorData, load_tensor_npz, save_tensor_npz
from service.storage.db import transaction
from service.storage.objects import Storage
from service.storage.sql import chunked
from service.storage.tables import Dataset, Record, utcnow
from service.trust.audit import append_event

log = logging.getLogger("lethe.purge")

EXTENSIONS = {"tensor": "npz", "text": "jsonl"}


@dataclass
class PurgeResult:
    dataset_id: str
    purged: int = 0  # records stamped purged_at
    rows_removed: int = 0  # rows dropped from the file
    old_key: str | None = None
    new_key: str | None = None
    deleted: list[str] = field(default_factory=list)


def key_sha256(key: str) -> str:
    """How record keys appear in audit events, lineage and receipts."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def dataset_file_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def rewrite_without(kind: str, raw: bytes, drop: set[str]) -> tuple[bytes, int, int]:
    """The file content without the records whose id is in `drop`; (bytes, removed, kept)."""
    if kind == "tensor":
        data = load_tensor_npz(raw)
        keep = [i for i, key in enumerate(data.ids) if key not in drop]
        removed = len(data.ids) - len(keep)
        if removed == 0:
            return raw, 0, len(keep)
        out = io.BytesIO()
        save_tensor_npz(
            out,
            TensorData(
                ids=[data.ids[i] for i in keep],
                inputs=data.inputs[keep],
                labels=data.labels[keep],
            ),
        )
        return out.getvalue(), removed, len(keep)
    if kind == "text":
        kept_lines: list[bytes] = []
        removed = 0
        for line in raw.splitlines(keepends=True):
            if not line.strip():
                continue
            key = str(json.loads(line)["id"])
            if key in drop:
                removed += 1
            else:
                kept_lines.append(line if line.endswith(b"\n") else line + b"\n")
        if removed == 0:
            return raw, 0, len(kept_lines)
        return b"".join(kept_lines), removed, len(kept_lines)
    raise ValueError(f"unknown dataset kind {kind!r}")


def _lock_dataset(session: Session, dataset_id: str) -> Dataset | None:
    return session.execute(
        select(Dataset)
        .where(Dataset.id == dataset_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def pending_datasets(factory: sessionmaker[Session]) -> list[str]:
    """Datasets with forgotten records whose content is not purged yet."""
    with factory() as session:
        return list(
            session.execute(
                select(Record.dataset_id)
                .where(Record.state == RecordState.FORGOTTEN, Record.purged_at.is_(None))
                .distinct()
            ).scalars()
        )


def purge_dataset(
    factory: sessionmaker[Session], storage: Storage, dataset_id: str, *, actor: str
) -> PurgeResult:
    result = PurgeResult(dataset_id)
    written: str | None = None
    try:
        with transaction(factory) as session:
            ds = _lock_dataset(session, dataset_id)
            if ds is None:
                return result
            pending = session.execute(
                select(Record.id, Record.key, Record.forgotten_by_job_id).where(
                    Record.dataset_id == dataset_id,
                    Record.state == RecordState.FORGOTTEN,
                    Record.purged_at.is_(None),
                )
            ).all()
            if pending:
                # Drop every forgotten key, not only the pending ones: a file restored from a
                # backup or an earlier half-done rewrite is cleaned as well.
                drop = set(
                    session.execute(
                        select(Record.key).where(
                            Record.dataset_id == dataset_id, Record.state == RecordState.FORGOTTEN
                        )
                    ).scalars()
                )
                with storage.open_read(ds.storage_key) as fh:
                    raw = fh.read()
                content, removed, kept = rewrite_without(ds.kind, raw, drop)
                del raw
                old_key, old_sha = ds.storage_key, ds.content_sha256
                if removed:
                    written = (
                        f"{dataset_file_prefix(ds.id)}-{uuid.uuid4().hex[:12]}."
                        + (EXTENSIONS[ds.kind])
                    )
                    new_sha, new_size = storage.write_bytes(written, content)
                    ds.storage_key, ds.content_sha256 = written, new_sha
                    meta = dict(ds.meta or {})
                    meta["current_size_bytes"] = new_size
                    meta["current_record_count"] = kept
                    ds.meta = meta
                del content
                now = utcnow()
                ids = [row.id for row in pending]
                for chunk in chunked(ids):
                    session.execute(
                        update(Record)
                        .where(Record.id.in_(chunk))
                        .values(purged_at=now)
                        .execution_options(synchronize_session=False)
                    )
                append_event(
                    session,
                    actor=actor,
                    action="content.purged",
                    subject_type="dataset",
                    subject_id=dataset_id,
                    payload={
                        "records": len(pending),
                        "rows_removed": removed,
                        "rows_kept": kept,
                        "job_ids": sorted(
                            {r.forgotten_by_job_id for r in pending if r.forgotten_by_job_id}
                        ),
                        "key_sha256": [key_sha256(r.key) for r in pending[:10000]],
                        "old_content_sha256": old_sha,
                        "new_content_sha256": ds.content_sha256,
                        "old_file_deleted": removed > 0,
                    },
                )
                result.purged, result.rows_removed = len(pending), removed
                result.old_key, result.new_key = old_key, ds.storage_key
    except BaseException:
        if written is not None:
            storage.delete(written)
        raise
    result.deleted = sweep_stale_files(factory, storage, dataset_id)
    if result.purged:
        log.info(
            "dataset %s: purged %d records (%d rows removed from the file)",
            dataset_id,
            result.purged,
            result.rows_removed,
        )
    return result


def sweep_stale_files(
    factory: sessionmaker[Session], storage: Storage, dataset_id: str
) -> list[str]:
    """Delete every file of the dataset except the current one (under the row lock)."""
    deleted: list[str] = []
    with transaction(factory) as session:
        ds = _lock_dataset(session, dataset_id)
        if ds is None:
            return deleted
        for key in list(storage.iter_keys(dataset_file_prefix(dataset_id))):
            if key != ds.storage_key:
                storage.delete(key)
                deleted.append(key)
    return deleted


def purge_pending(
    factory: sessionmaker[Session], storage: Storage, *, actor: str
) -> list[PurgeResult]:
    """Finish every pending purge (the reaper's periodic step)."""
    results = []
    for dataset_id in pending_datasets(factory):
        try:
            results.append(purge_dataset(factory, storage, dataset_id, actor=actor))
        except Exception as exc:  # storage down: the next tick tries again
            log.warning("dataset %s: purge failed (%s); will retry", dataset_id, exc)
    return results


def describe(result: PurgeResult) -> dict[str, Any]:
    return {
        "dataset_id": result.dataset_id,
        "purged": result.purged,
        "rows_removed": result.rows_removed,
        "files_deleted": len(result.deleted),
    }
