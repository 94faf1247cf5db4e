"""A bound on every PostgreSQL round trip of an engine, kept by one thread per engine.

Past the bound the connection's socket is shut down: the blocked call fails with a
disconnect error (503 at the API) and the pool drops the connection. Why not only TCP
settings: keepalives and tcp_user_timeout see a network that drops packets, but not a peer
that accepts bytes and never answers (a hung proxy, a stalled server), and a server-side
statement_timeout needs the server to hear the statement. Measured before: requests on
pooled connections, and /readyz, hung 90 s.

Arming is a dictionary insert: an earlier version started a timer thread per statement,
which was a fifth of a GET's time on PostgreSQL (py-spy, bench/api_throughput.py).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from contextlib import suppress
from typing import Any

from sqlalchemy import Engine, event

INFO_KEY = "lethe_watchdog"


class StatementWatchdog:
    """Armed round trips by token; one daemon thread severs the ones past their deadline,
    checking a few times per bound (so a round trip is cut within 1.25 bounds)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tick = max(0.01, seconds / 4)
        self._armed: dict[int, tuple[float, int]] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, dbapi_connection: Any) -> int | None:
        fd = getattr(getattr(dbapi_connection, "pgconn", None), "socket", None)
        if not isinstance(fd, int) or fd < 0:
            return None
        token = next(self._tokens)
        with self._lock:
            self._armed[token] = (time.monotonic() + self.seconds, fd)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._watch, name="lethe-db-watchdog", daemon=True
                )
                self._thread.start()
        return token

    def disarm(self, token: int | None) -> None:
        if token is not None:
            with self._lock:
                self._armed.pop(token, None)

    def _watch(self) -> None:
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            # Severed under the lock: a disarmed round trip's socket (maybe closed and its
            # number reused since) is never touched.
            with self._lock:
                late = [t for t, (deadline, _fd) in self._armed.items() if deadline <= now]
                for token in late:
                    sever(self._armed.pop(token)[1])

    def pending(self) -> int:
        with self._lock:
            return len(self._armed)


def sever(fd: int) -> None:
    with suppress(OSError):
        dup = socket.socket(fileno=os.dup(fd))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


def add_statement_watchdog(engine: Engine, seconds: float) -> StatementWatchdog:
    """Bound every round trip of ``engine`` (statements and the pool's pings) to ``seconds``."""
    watchdog = StatementWatchdog(seconds)

    @event.listens_for(engine, "before_cursor_execute")
    def _arm(conn: Any, _cursor: Any, *_args: Any) -> None:
        conn.info[INFO_KEY] = watchdog.arm(conn.connection.dbapi_connection)

    def _disarm(conn: Any) -> None:
        watchdog.disarm(conn.info.pop(INFO_KEY, None))

    event.listen(engine, "after_cursor_execute", lambda conn, *_a: _disarm(conn))
    event.listen(
        engine, "handle_error", lambda ctx: _disarm(ctx.connection) if ctx.connection else None
    )
    ping = engine.dialect.do_ping

    def guarded_ping(dbapi_connection: Any) -> bool:
        token = watchdog.arm(dbapi_connection)
        try:
            return bool(ping(dbapi_connection))
        finally:
            watchdog.disarm(token)

    engine.dialect.do_ping = guarded_ping  # type: ignore[method-assign]
    return watchdog


__all__ = ["StatementWatchdog", "add_statement_watchdog", "sever"]
