"""The statement watchdog (service/storage/watchdog.py): a round trip past the bound has its
socket shut down; one that ends in time is never touched; one thread serves every armed
round trip. Against real PostgreSQL, a statement that outlives the bound fails with a
disconnect and the next checkout works."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.storage.db import make_engine
from service.storage.watchdog import StatementWatchdog, add_statement_watchdog


def _connection(sock: socket.socket) -> SimpleNamespace:
    return SimpleNamespace(pgconn=SimpleNamespace(socket=sock.fileno()))


def test_late_round_trips_are_severed_and_timely_ones_are_not() -> None:
    watchdog = StatementWatchdog(0.2)
    late_a, late_b = socket.socketpair()
    kept_a, kept_b = socket.socketpair()
    try:
        threads_before = threading.active_count()
        armed_at = time.monotonic()
        late = watchdog.arm(_connection(late_a))
        kept = watchdog.arm(_connection(kept_a))
        assert threading.active_count() <= threads_before + 1  # one watcher, not one per arm
        watchdog.disarm(kept)
        late_b.settimeout(5.0)  # a loaded machine may wake the watcher late, never early
        assert late_b.recv(1) == b""  # the peer sees the shutdown
        assert time.monotonic() - armed_at >= 0.2
        assert watchdog.pending() == 0 and late is not None
        kept_a.sendall(b"x")  # untouched: still usable both ways
        assert kept_b.recv(1) == b"x"
    finally:
        for s in (late_a, late_b, kept_a, kept_b):
            s.close()


@pytest.mark.postgres
def test_a_statement_past_the_bound_fails_and_the_pool_recovers(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    watchdog = add_statement_watchdog(engine, 0.5)
    try:
        started = time.monotonic()
        with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(10)"))
        assert caught.value.connection_invalidated
        assert time.monotonic() - started < 3.0
        with engine.connect() as conn:  # a fresh connection; a quick statement is left alone
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        assert watchdog.pending() == 0
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_idle_connections_are_pinged_and_busy_ones_are_not(postgres_url: str) -> None:
    from sqlalchemy import event

    from service.storage.db import PING_AFTER_IDLE_S

    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    pings = []
    ping = engine.dialect.do_ping
    engine.dialect.do_ping = lambda c: pings.append(1) or ping(c)  # type: ignore[method-assign]
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as conn:  # straight back out of the pool: no ping
            conn.execute(text("SELECT 1"))
        assert pings == []
        # The server ends the pooled connection while it sits idle ...
        admin = make_engine(postgres_url)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        admin.dispose()
        time.sleep(PING_AFTER_IDLE_S + 0.2)
        # ... the checkout pings it, finds it dead and hands out a new one: no error.
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert len(pings) == 1
        # Ended while idle for less than the bound: the socket has the server's goodbye
        # waiting, so the checkout pings it and hands out a new connection as well.
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        admin = make_engine(postgres_url)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        admin.dispose()
        time.sleep(0.2)  # the termination notice reaches the socket
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert len(pings) == 2
    finally:
        engine.dispose()
