"""Engine and session factory for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import select
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

# Execution option marking a connection whose transaction will write (see `transaction()`).
WRITE_OPTION = "lethe_write"
# Marks a SQLite connection that runs one read statement outside a transaction.
READ_ONCE_OPTION = "lethe_read_once"
# One per SQLite engine: this process's units of work queue here, in order, instead of in
# SQLite's busy handler, which polls with sleeps of up to 100 ms (a 40-thread pool made most
# of a POST's time such sleeps). Other processes (executor, workers) still meet at SQLite's
# lock and its busy_timeout.
LOCK_TIMEOUT_S = 30.0
PING_AFTER_IDLE_S = 1.0  # PostgreSQL: pooled connections idle longer are pinged at checkout
# Back in the pool for less than this: reused without looking at its socket. Under load a
# connection is reused within milliseconds, and that look (a select() per checkout) was a
# tenth of a GET's time. One the server ended in those moments fails its statement with a
# disconnect (503; the pool replaces it), as one ended mid-statement does.
LOOK_AFTER_IDLE_S = 0.05
IDLE_SINCE = "lethe_idle_since"
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()


def make_engine(url: str, **kwargs: object) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": LOCK_TIMEOUT_S, "check_same_thread": False}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _WRITE_LOCKS[engine] = threading.RLock()

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while the executor writes; FKs are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(LOCK_TIMEOUT_S * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Units of work (`transaction()`) take the write lock up front with BEGIN IMMEDIATE,
            # so read-then-write transactions (claims, audit appends) serialise instead of
            # failing with "database is locked" when their WAL snapshot goes stale. Everything
            # else only reads: a deferred BEGIN keeps WAL's concurrent readers, which neither
            # wait for each other nor for a writer.
            options = conn.get_execution_options()
            if options.get(READ_ONCE_OPTION):
                return  # `read_once()`: one statement, atomic by itself; no BEGIN/ROLLBACK
            conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE_OPTION) else "BEGIN")

        @event.listens_for(engine, "connect")
        def _sqlite_no_autobegin(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        return engine
    engine = create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_idle_connections(engine, PING_AFTER_IDLE_S)
    return engine


def _ping_idle_connections(engine: Engine, idle_s: float) -> None:
    """Pessimistic disconnect handling without a round trip per checkout (a ping per checkout
    was a third of a GET's round trips): a connection is pinged (and replaced if dead) when it
    sat idle in the pool more than ``idle_s``, or when its socket has input waiting — an idle
    connection is sent nothing unless the server is ending it (a terminated backend, a
    restart), so that check is one poll of the socket, skipped for a connection that was
    checked in moments ago (``LOOK_AFTER_IDLE_S``)."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        record.info[IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(IDLE_SINCE)
        if since is None:
            return  # just connected
        idle = time.monotonic() - since
        if idle < LOOK_AFTER_IDLE_S or (idle < idle_s and not _has_unread_input(dbapi_conn)):
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool retries with a new connection
            raise DisconnectionError(f"idle connection is dead: {exc}") from exc
        if not alive:
            raise DisconnectionError("idle connection is dead")


def _has_unread_input(dbapi_conn: Any) -> bool:
    fd = getattr(getattr(dbapi_conn, "pgconn", None), "socket", None)
    if not isinstance(fd, int) or fd < 0:
        return True  # cannot tell: ping
    try:
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error.

    On SQLite it holds the database's write lock from its first statement (BEGIN IMMEDIATE);
    sessions opened with `factory()` alone are for reading and begin deferred. On PostgreSQL
    the option is inert: row locks (FOR UPDATE, UPDATE) do the serialising there.
    """
    with _write_lock(factory.kw.get("bind")), factory() as session, session.begin():
        session.connection(execution_options={WRITE_OPTION: True})
        yield session


def _write_lock(engine: Engine | None) -> AbstractContextManager[object]:
    lock = _WRITE_LOCKS.get(engine) if engine is not None else None
    if lock is None:
        return nullcontext()
    # The same bound as SQLite's busy_timeout: a stuck writer fails others, never hangs them.
    if not lock.acquire(timeout=LOCK_TIMEOUT_S):
        raise TimeoutError(f"database is locked: no write lock after {LOCK_TIMEOUT_S:.0f}s")
    return _Release(lock)


class _Release:
    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@contextmanager
def read_once(factory: sessionmaker[Session]) -> Iterator[Connection]:
    """A connection for a single read statement (hot GET routes), with no transaction around
    it: no BEGIN and ROLLBACK round trips, no ORM session. One statement sees one consistent
    snapshot on its own; use a session for reads that need several statements to agree."""
    engine: Engine = factory.kw["bind"]
    options: dict[str, object] = (
        {"isolation_level": "AUTOCOMMIT"} if is_postgres(engine) else {READ_ONCE_OPTION: True}
    )
    with engine.connect().execution_options(**options) as conn:
        yield conn


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"
