"""Group commit: units from many threads share transactions, each in its own savepoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from service.storage import migrate
from service.storage.db import make_engine, make_session_factory
from service.storage.group_commit import GroupCommit, batch_hints, batch_log, batch_memo
from service.storage.tables import Counter


class Refused(Exception):
    pass


def test_units_commit_together_and_fail_alone(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    group = GroupCommit(factory, max_batch=8)
    batches: list[int] = []
    run_batch = group._run_batch

    def counted() -> None:
        batches.append(len(group._queue))
        run_batch()

    group._run_batch = counted  # type: ignore[method-assign]
    results: dict[int, object] = {}
    start = threading.Barrier(24)

    def work(i: int) -> None:
        def unit(session: Session) -> int:
            session.add(Counter(name=f"c{i}", value=i))
            session.flush()
            time.sleep(0.005)  # the others queue up meanwhile
            if i % 5 == 0:  # written, then refused: its savepoint must undo the row
                raise Refused(i)
            return i * 10

        start.wait()
        try:
            results[i] = group.run(unit)
        except Refused as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(not t.is_alive() for t in threads)
    for i in range(24):
        if i % 5 == 0:
            assert isinstance(results[i], Refused)
        else:
            assert results[i] == i * 10
    with factory() as session:
        names = set(session.execute(select(Counter.name).where(Counter.name.like("c%"))).scalars())
    assert names == {f"c{i}" for i in range(24) if i % 5}
    # Shared commits: fewer transactions than units, none larger than max_batch.
    assert len(batches) < 24 and max(min(n, 8) for n in batches) > 1
    engine.dispose()


def test_a_unit_that_breaks_a_constraint_fails_alone_and_the_group_goes_on(sqlite_url: str) -> None:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    group = GroupCommit(factory)

    def duplicate(session: Session) -> None:
        # Two rows with one primary key: the flush in the unit fails inside its savepoint...
        session.add(Counter(name="dup", value=1))
        session.flush()

    group.run(duplicate)
    with pytest.raises(Exception, match="UNIQUE|unique"):
        group.run(duplicate)
    # ... and the group keeps working afterwards.
    group.run(lambda s: s.add(Counter(name="after", value=2)))
    with factory() as session:
        count = session.execute(select(func.count()).select_from(Counter)).scalar_one()
        assert session.get(Counter, "after") is not None and count >= 2
    engine.dispose()


def test_read_only_units_skip_the_savepoint_and_keep_what_the_batch_shared(
    database_url: str,
) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    group = GroupCommit(factory)
    savepoints: list[str] = []

    @event.listens_for(engine, "savepoint")
    def _seen(_conn: object, name: str) -> None:
        savepoints.append(name)

    go, holding = threading.Event(), threading.Event()

    def hold_the_lead(_session: Session) -> None:
        holding.set()
        assert go.wait(30)

    def reader(i: int) -> Callable[[Session], int]:
        def unit(session: Session) -> int:
            memo, log = batch_memo(session), batch_log(session)
            memo.setdefault("read", []).append(i)
            # Every unit sees the whole batch's hints, its later units' included.
            assert batch_hints(session) == ["k0", "k1", "k2"]
            if i == 1:
                raise Refused(i)  # before any write: nothing to roll back
            log.setdefault("left", []).append(i)
            return i

        return unit

    def write_all(session: Session, values: list[int]) -> None:
        # The log survives a failed unit; the final step writes for the ones that succeeded.
        assert batch_log(session)["left"] == values == [0, 2]
        assert batch_memo(session)["read"] == [0, 1, 2]  # no savepoint rolled back: kept
        session.add_all(Counter(name=f"r{i}", value=i) for i in values)

    leader = threading.Thread(target=group.run, args=(hold_the_lead,))
    leader.start()
    assert holding.wait(10)
    results: dict[int, object] = {}

    def submit(i: int) -> None:
        try:
            results[i] = group.run(reader(i), write_all, savepoint=False, hint=f"k{i}")
        except Refused as exc:
            results[i] = exc

    threads = []
    for i in range(3):  # queued in order behind the held leader: one batch
        threads.append(threading.Thread(target=submit, args=(i,)))
        threads[-1].start()
        while len(group._queue) < i + 1:
            time.sleep(0.005)
    savepoints.clear()
    go.set()
    for t in [leader, *threads]:
        t.join(30)
    assert results[0] == 0 and results[2] == 2 and isinstance(results[1], Refused)
    assert savepoints == []
    with factory() as session:
        names = set(session.execute(select(Counter.name).where(Counter.name.like("r%"))).scalars())
    assert names == {"r0", "r2"}
    engine.dispose()
