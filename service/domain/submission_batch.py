"""A batch of submissions, as the group commit's final step writes it (`finish_batch`).

Each submission's unit (service.domain.requests) read without locks and left its rows here;
this step takes the locks in one order (datasets, models, the audit chain head) and writes
the batch: the requests, their record holds as a compare-and-set, the jobs with their line
positions and the audit events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert, or_, select, update
from sqlalchemy.orm import Session

from service.domain.lines import active_before
from service.domain.record_holds import Seen, hold_all, lock_datasets
from service.storage.group_commit import RetryBatch, batch_hints
from service.storage.tables import Dataset, DeletionRequest, Job, Model
from service.trust.audit import append_events

REQUESTS = cast(Table, DeletionRequest.__table__)
JOBS = cast(Table, Job.__table__)


@dataclass
class Submission:
    body: dict[str, Any]
    job_id: str
    request_id: str
    replayed: bool
    # What the batch's final step writes: the audit event, the job row (given its line
    # position there), the request row (None once inserted: a unit with an Idempotency-Key
    # inserts its own) and the holds of the request's records. Rows are column dicts for one
    # Core executemany per table.
    event: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    request: dict[str, Any] | None = None
    holds: tuple[str, list[str], str, Seen] | None = None
    wake: bool = False  # its job heads the model's line: send it a run message (domain.lines)


def take_seqs(session: Session, model_id: str, count: int) -> int:
    """Take ``count`` line positions of the model; returns the last. The row lock it takes
    lasts until commit (it is taken in the batch's final step, for a few statements)."""
    models = cast(Table, Model.__table__)  # Core: nothing in the session to synchronise
    value = session.execute(
        update(models)
        .where(models.c.id == model_id)
        .values(job_seq=models.c.job_seq + count)
        .returning(models.c.job_seq)
    ).scalar_one()
    return int(value)


def finish_batch(session: Session, submissions: list[Submission]) -> None:
    """The requests without an Idempotency-Key (their units ran without a savepoint), then,
    under the datasets' locks, every request's holds in bulk; then line positions per model
    (one counter update per model, in id order so batches of other processes lock the rows in
    the same order), the job rows, then the audit events (one chain-head lock for the batch).
    A hold that finds its record changed since it was read runs the batch again, locked."""
    # Before the locks: a request row's foreign key takes only a key-share lock on its
    # dataset, which the dataset lock below does not conflict with.
    deferred = [sub.request for sub in submissions if sub.request is not None]
    if deferred:
        session.execute(insert(REQUESTS), deferred)
    holds = [sub.holds for sub in submissions if sub.holds is not None]
    lock_datasets(session, (dataset_id for dataset_id, *_ in holds))
    if not hold_all(session, holds):
        refs = [ref for ref, _ in batch_hints(session)]
        raise RetryBatch(
            lambda locked: lock_named_datasets(locked, refs),
            "a record changed between a submission's read and its hold",
        )
    jobs = [sub.job for sub in submissions if sub.job is not None]
    by_model: dict[str, list[dict[str, Any]]] = {}
    heads: set[str] = set()
    for job in jobs:
        by_model.setdefault(job["model_id"], []).append(job)
    for model_id in sorted(by_model):
        line = by_model[model_id]
        last = take_seqs(session, model_id, len(line))
        for offset, job in enumerate(line):
            job["submitted_seq"] = last - len(line) + 1 + offset
        # Under the model row's lock (taken just above): only a head of the line needs a
        # message; the jobs behind it are woken in turn (service.domain.lines).
        if not active_before(session, model_id, line[0]["submitted_seq"]):
            heads.add(line[0]["id"])
    if jobs:
        session.execute(insert(JOBS), jobs)
    for sub in submissions:
        sub.wake = sub.job_id in heads
    events = []
    for sub in submissions:
        if sub.event is not None and sub.job is not None:
            sub.event["payload"]["submitted_seq"] = sub.job["submitted_seq"]
            events.append(sub.event)
    append_events(session, events)


def lock_named_datasets(session: Session, refs: list[str]) -> None:
    """The retry's first step: lock every dataset the batch names, before any unit reads."""
    named = select(Dataset.id).where(or_(Dataset.id.in_(refs), Dataset.name.in_(refs)))
    lock_datasets(session, session.scalars(named))
