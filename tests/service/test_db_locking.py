"""SQLite transaction modes: reads begin deferred (WAL readers run beside a writer), units of
work begin immediate (writers serialise instead of failing on a stale snapshot)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from sqlalchemy import text

from service.storage.db import make_engine, make_session_factory, read_once, transaction


def _engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'lock.db'}")
    with transaction(make_session_factory(engine)) as s:
        s.execute(text("CREATE TABLE t (v INTEGER)"))
        s.execute(text("INSERT INTO t VALUES (1)"))
    return engine


def _write_lock_free(path: Path) -> bool:
    """Can a foreign connection take the write lock right now (no waiting)?"""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    finally:
        conn.close()


def test_read_session_does_not_take_the_write_lock(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    factory = make_session_factory(engine)
    with factory() as reader:
        assert reader.execute(text("SELECT v FROM t")).scalar_one() == 1
        assert reader.in_transaction()
        assert _write_lock_free(tmp_path / "lock.db")
        # A unit of work commits while the read transaction is still open ...
        with transaction(factory) as writer:
            writer.execute(text("UPDATE t SET v = 2"))
        # ... and the reader keeps its snapshot until it ends.
        assert reader.execute(text("SELECT v FROM t")).scalar_one() == 1
    with factory() as fresh:
        assert fresh.execute(text("SELECT v FROM t")).scalar_one() == 2
    engine.dispose()


def test_unit_of_work_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        # No statement yet, but the lock is held: a read-then-write cannot interleave.
        assert not _write_lock_free(tmp_path / "lock.db")
        session.execute(text("SELECT v FROM t")).scalar_one()
    assert _write_lock_free(tmp_path / "lock.db")
    engine.dispose()


def test_read_then_write_units_serialise(tmp_path: Path) -> None:
    """Increments read the value and write it back; none is lost across threads."""
    engine = _engine(tmp_path)
    factory = make_session_factory(engine)

    def bump() -> None:
        for _ in range(20):
            with transaction(factory) as s:
                v = s.execute(text("SELECT v FROM t")).scalar_one()
                s.execute(text("UPDATE t SET v = :v"), {"v": v + 1})

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with factory() as s:
        assert s.execute(text("SELECT v FROM t")).scalar_one() == 1 + 4 * 20
    engine.dispose()


def test_read_once_runs_outside_any_transaction(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    factory = make_session_factory(engine)
    with read_once(factory) as conn:
        assert conn.execute(text("SELECT v FROM t")).scalar_one() == 1
        # No BEGIN was sent: SQLite is in autocommit mode, holding no snapshot or lock.
        assert conn.connection.driver_connection.in_transaction is False
    with factory() as session:
        session.execute(text("SELECT v FROM t")).scalar_one()
        assert session.connection().connection.driver_connection.in_transaction is True
    engine.dispose()
