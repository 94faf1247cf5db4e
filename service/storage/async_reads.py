"""Single-statement PostgreSQL reads on the event loop, for the hot polling routes.

A sync read goes to the thread pool so that a network round trip never stalls the loop; on
two cores that hop (a futex hand-off each way) is what GET job paid for: 0.33x /healthz
with it, 0.63x with the same read run blocking on the loop (bench/api_throughput.py).
psycopg's async connection waits on the socket through the loop instead: no thread, and no
stall. The statement is the routes' own SQLAlchemy `select`, compiled once for psycopg;
rows come back with the same column names.

Connections: their own small pool (psycopg_pool), in autocommit (one statement is its own
snapshot: no BEGIN or ROLLBACK round trips), with the engine's connect arguments (connect
timeout, keepalives, tcp_user_timeout, server statement_timeout). Every read is bounded on
the loop as well (``bound_s``; past it the socket is shut, as the watchdog does), which also
covers a peer that accepts bytes and never answers. A connection-level failure or the bound
is raised as SQLAlchemy's DisconnectionError, which the API answers like any lost
database: 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL
from sqlalchemy.sql import Select

from service.storage.watchdog import sever

_DIALECT = PGDialect_psycopg()


def conninfo(url: URL) -> str:
    """A libpq URI for SQLAlchemy's ``postgresql+psycopg://`` URL (query options kept)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncReads:
    def __init__(
        self, url: URL, connect_args: dict[str, Any], *, bound_s: float, size: int
    ) -> None:
        self.bound_s = bound_s
        self._size = size
        self._compiled: dict[int, str] = {}
        self._pool = AsyncConnectionPool(
            conninfo(url),
            kwargs={**connect_args, "autocommit": True, "row_factory": namedtuple_row},
            min_size=size,  # opened at start, in the background: the first polls do not wait
            max_size=size,
            open=False,
            timeout=bound_s,  # waiting for a free connection
        )

    async def open(self) -> None:
        # Not waiting: a database that is down at start-up is answered 503 until it is back.
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    def _sql(self, statement: Select[Any]) -> str:
        key = id(statement)  # module-level statements, built once
        if key not in self._compiled:
            self._compiled[key] = str(statement.compile(dialect=_DIALECT))
        return self._compiled[key]

    async def first(self, statement: Select[Any], params: dict[str, Any]) -> Any | None:
        """The statement's first row (attributes by column name), or None."""
        sql = self._sql(statement)
        try:
            for attempt in range(self._size + 1):
                async with self._pool.connection() as conn:  # waits at most bound_s
                    try:
                        return await self._bounded(conn, sql, params)
                    except psycopg.OperationalError:
                        # Ended by the server while pooled (a restart, a terminated backend):
                        # a read is safe to repeat on another connection; this one is dropped.
                        if not conn.broken or attempt == self._size:
                            raise
            raise AssertionError("unreachable: the last attempt returns or raises")
        except (TimeoutError, PoolTimeout, psycopg.OperationalError) as exc:
            raise sa_exc.DisconnectionError(f"database unreachable: {exc}") from exc

    async def _bounded(self, conn: AsyncConnection[Any], sql: str, params: dict[str, Any]) -> Any:
        # Not asyncio.timeout: a cancelled psycopg read first asks the server to cancel, over
        # a new connection to the same silent peer (a poll took 12 s against a 2 s bound).
        # Shutting the socket makes the pending read fail at once and the pool drop it.
        read = asyncio.ensure_future(_fetch_first(conn, sql, params))
        try:
            done, _ = await asyncio.wait({read}, timeout=self.bound_s)
        except asyncio.CancelledError:  # the client went away: the connection must settle
            _shut(conn)
            await asyncio.shield(asyncio.wait({read}))
            raise
        if not done:
            _shut(conn)
            await asyncio.wait({read})
            raise TimeoutError(f"no answer within {self.bound_s:g} s")
        return read.result()


def _shut(conn: AsyncConnection[Any]) -> None:
    with suppress(psycopg.Error):  # already closed: nothing to shut
        sever(conn.pgconn.socket)


async def _fetch_first(conn: AsyncConnection[Any], sql: str, params: dict[str, Any]) -> Any:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchone()


__all__ = ["AsyncReads", "conninfo"]
