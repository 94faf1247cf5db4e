"""Submissions that share one commit (service/storage/group_commit.py, `finish_batch` in
service/domain/submission_batch.py), on SQLite and PostgreSQL: a batch is held back until a dozen
submissions wait behind it, then they are recorded together. Line positions stay gapless
and in queue order, an Idempotency-Key twin inside the batch gets the first answer (a
different body under the same key is 409), a refused unit fails alone, and the audit chain
verifies with each `request.accepted` event naming its job's position."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from service.domain.requests import DeletionRequestIn, submit_deletion_request
from service.errors import Conflict, DomainError, Invalid
from service.storage.db import make_engine, make_session_factory
from service.storage.group_commit import group_commit
from service.storage.tables import AuditEvent, DeletionRequest, Job, Record
from service.trust.audit import verify_chain
from tests.worker.harness import Stack, Trained, api_stack, stack_settings


@pytest.fixture
def stack(lethe_env: Path, database_url: str, storage_dir: Path) -> Iterator[Stack]:
    settings = stack_settings(database_url=database_url, storage_dir=storage_dir)
    with api_stack(settings) as s:
        yield s


def test_one_batch_of_submissions(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    dataset = stack.models[model]
    group = group_commit(stack.sessions)
    go, holding = threading.Event(), threading.Event()

    def hold_the_lead(_session: Any) -> None:
        holding.set()
        assert go.wait(30)

    leader = threading.Thread(target=group.run, args=(hold_the_lead,))
    leader.start()
    assert holding.wait(10)
    plan: list[tuple[list[str], str | None]] = [([k], None) for k in trained.train_ids[:8]]
    plan += [
        (trained.train_ids[8:10], "twin"),
        (trained.train_ids[8:10], "twin"),  # same body
        (trained.train_ids[10:11], "clash"),
        (trained.train_ids[11:12], "clash"),  # other body
        # Names a key an earlier keyless unit holds: that hold is written only in the final
        # step, and the keyed unit before this one rolled its savepoint back meanwhile.
        (trained.train_ids[:1], None),
    ]
    answers: dict[int, Any] = {}

    def submit(i: int) -> None:
        keys, idem = plan[i]
        body = DeletionRequestIn(model=model, dataset=dataset, record_keys=keys, method="imu")
        try:
            answers[i] = submit_deletion_request(
                stack.sessions, stack.settings, body, actor="test", idempotency_key=idem
            )
        except DomainError as exc:
            answers[i] = exc

    record_reads: list[str] = []

    @event.listens_for(stack.sessions.kw["bind"], "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM records" in statement:
            record_reads.append(statement)

    threads = []
    for i in range(len(plan)):  # queued one after the other: the batch keeps this order
        threads.append(threading.Thread(target=submit, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(group._queue) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert len(group._queue) == len(plan)
    go.set()
    for t in [leader, *threads]:
        t.join(30)
    event.remove(stack.sessions.kw["bind"], "before_cursor_execute", _seen)
    # The first unit reads the records of the whole batch (12 units reached the check); the
    # replayed twin's and the clash's rolled-back savepoints each make the next unit read
    # again (nothing a rolled-back savepoint read is trusted).
    assert len(record_reads) == 3, record_reads
    for i in range(8):
        assert not isinstance(answers[i], Exception), answers[i]
    assert answers[9].replayed and answers[9].job_id == answers[8].job_id
    assert isinstance(answers[11], Conflict) and answers[11].code == "idempotency-key-reused"
    assert isinstance(answers[12], Invalid) and answers[12].code == "invalid-record-keys"
    accepted = [answers[i] for i in (*range(9), 10)]
    with stack.sessions() as session:
        jobs = {j.id: j for j in session.execute(select(Job)).scalars()}
        assert set(jobs) == {a.job_id for a in accepted}  # one job per accepted request
        # Gapless, in the order the submissions queued.
        assert [jobs[a.job_id].submitted_seq for a in accepted] == list(range(1, 11))
        n_requests = len(session.execute(select(DeletionRequest.id)).all())
        assert n_requests == len(accepted)
        # Each accepted request holds its records, the deferred (keyless) ones included.
        held = dict(
            session.execute(
                select(Record.key, Record.held_by_request_id).where(
                    Record.key.in_(trained.train_ids[:12])
                )
            ).all()
        )
        for i in (*range(9), 10):
            for key in plan[i][0]:
                assert held[key] == answers[i].request_id, (i, key)
        assert held[trained.train_ids[11]] is None  # the refused twin holds nothing
        events = session.execute(
            select(AuditEvent).where(AuditEvent.action == "request.accepted")
        ).scalars()
        positions = {e.payload["job_id"]: e.payload["submitted_seq"] for e in events}
        assert positions == {a.job_id: jobs[a.job_id].submitted_seq for a in accepted}
        assert verify_chain(session)["ok"]


@pytest.fixture
def pg_stack(lethe_env: Path, postgres_url: str, storage_dir: Path) -> Iterator[Stack]:
    settings = stack_settings(database_url=postgres_url, storage_dir=storage_dir)
    with api_stack(settings) as s:
        yield s


@pytest.mark.postgres
@pytest.mark.parametrize("wide", [False, True], ids=["one-key", "70-keys"])
def test_a_stale_read_reruns_the_batch_under_the_lock(
    pg_stack: Stack, trained: Trained, wide: bool
) -> None:
    """Units read records without a lock. Here another API process (its own engine, so its
    own group commit) holds one of the batch's keys after the batch read it and before the
    batch's final step locks the dataset: the compare-and-set catches it, the batch runs
    again under the lock, and only the submission naming that key is refused. ``wide``: that
    submission names 70 keys, which are held with IN lists instead of the shared executemany."""
    stack = pg_stack
    model = stack.register(trained, "mlp")
    dataset = stack.models[model]
    k0, k1, k2 = trained.train_ids[:3]
    extra = list(trained.train_ids[3:72]) if wide else []
    other = make_session_factory(make_engine(stack.settings.db_url))
    group = group_commit(stack.sessions)
    go, holding = threading.Event(), threading.Event()

    def hold_the_lead(_session: Any) -> None:
        holding.set()
        assert go.wait(30)

    def body(keys: list[str]) -> DeletionRequestIn:
        return DeletionRequestIn(model=model, dataset=dataset, record_keys=keys, method="imu")

    rival: dict[str, Any] = {}
    locks: list[str] = []
    record_reads: list[str] = []

    @event.listens_for(stack.sessions.kw["bind"], "before_cursor_execute")
    def _interleave(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM records" in statement:
            record_reads.append(statement)
        if "FOR NO KEY UPDATE" in statement and "datasets" in statement:
            locks.append(statement)
            if len(locks) == 1:  # the first final step, about to lock: the rival commits
                rival["answer"] = submit_deletion_request(
                    other, stack.settings, body([k1]), actor="rival"
                )

    leader = threading.Thread(target=group.run, args=(hold_the_lead,))
    leader.start()
    assert holding.wait(10)
    answers: dict[str, Any] = {}

    def submit(key: str) -> None:
        try:
            answers[key] = submit_deletion_request(
                stack.sessions,
                stack.settings,
                body([key] + (extra if key == k1 else [])),
                actor="test",
            )
        except DomainError as exc:
            answers[key] = exc

    threads = []
    for i, key in enumerate((k0, k1, k2)):
        threads.append(threading.Thread(target=submit, args=(key,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(group._queue) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert len(group._queue) == 3
    go.set()
    for t in [leader, *threads]:
        t.join(30)
    event.remove(stack.sessions.kw["bind"], "before_cursor_execute", _interleave)
    other.kw["bind"].dispose()

    # Attempt one read, found k1 taken at its compare-and-set; attempt two locked first.
    assert len(record_reads) == 2 and len(locks) == 2, (record_reads, locks)
    refused = answers[k1]
    assert isinstance(refused, Invalid) and refused.code == "invalid-record-keys"
    assert refused.extra["pending"] == [k1]
    for key in (k0, k2):
        assert not isinstance(answers[key], Exception), answers[key]
    with stack.sessions() as session:
        held = dict(
            session.execute(
                select(Record.key, Record.held_by_request_id).where(Record.key.in_([k0, k1, k2]))
            ).all()
        )
        assert held == {
            k0: answers[k0].request_id,
            k1: rival["answer"].request_id,
            k2: answers[k2].request_id,
        }
        seqs = sorted(session.execute(select(Job.submitted_seq)).scalars())
        assert seqs == [1, 2, 3]  # the rival's job, then the batch's two: no gaps
        assert session.execute(select(DeletionRequest.id)).all().__len__() == 3
        assert verify_chain(session)["ok"]
