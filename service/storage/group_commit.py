"""Group commit: units of work from many callers share one transaction and one commit.

Submissions serialise on purpose (the job counter row, the audit chain head), so their
throughput is one critical section per request, and on SQLite about half of that section is
the commit's fsync. Here one thread per database runs every unit queued while the previous
batch ran: each unit in its own SAVEPOINT (a unit that raises rolls back alone and gets its
own exception), then one commit for the batch. Callers are threads (`run`) or coroutines
(`run_async`). Nobody waits for a batch to fill: under no load a batch is one unit,
so latency is unchanged; under load the commit is shared. A caller returns only after the
commit that holds its work, so an answer is never given for work that could still be lost.

A unit may name a `final` step, run once per batch just before the commit with the results
of every unit that succeeded with that step: work that takes a lock others wait for (the
audit chain head, a model's job counter) goes there, in bulk, so the lock is held for a few
statements per batch instead of the whole batch. Units of one batch may share what they
read through `batch_memo(session)`; it is emptied when a unit's savepoint is rolled back, so
nothing that savepoint did (a row lock taken, a row read) is trusted by the units after it.

A unit that only reads, and raises before anything it would write (its writes ride to the
`final` step), may run without a savepoint (`savepoint=False`): on PostgreSQL the SAVEPOINT
and RELEASE are two of a submission's few round trips, and the batch's round trips in a row
are what bounds its throughput. What such units leave for each other and for `final` goes
in `batch_log(session)`, which a rollback of another unit does not empty.

A unit may carry a `hint` (what it is about to read); `batch_hints(session)` lists the hints
of every unit in the batch, so the first unit can read for all of them in one statement
instead of each unit paying its own round trip while the batch holds its locks.

Units may read without the locks that would keep their reads current, and a `final` step
check under those locks that nothing it relies on changed (a compare-and-set). When the check
fails it raises `RetryBatch`: the whole transaction is rolled back and the batch runs once
more, with the retry's `prepare` step (taking the locks) run first, so the second attempt
reads under the locks and cannot fail the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.storage.db import transaction

T = TypeVar("T")
MAX_BATCH = 64  # bounds the time one commit holds the write lock
MEMO_KEY = "lethe_batch_memo"
LOG_KEY = "lethe_batch_log"
HINTS_KEY = "lethe_batch_hints"


class RetryBatch(Exception):
    """Raised by a `final` step whose batch read something that changed before the step took
    its locks; ``prepare(session)`` runs at the start of the second attempt, outside any unit's
    savepoint (so a unit's rollback cannot release what it takes)."""

    def __init__(self, prepare: Callable[[Session], None], reason: str) -> None:
        super().__init__(reason)
        self.prepare = prepare


def batch_memo(session: Session) -> dict[Any, Any]:
    """What this batch's units have read and locked so far (empty outside a batch's units
    and after a unit's savepoint was rolled back)."""
    memo: dict[Any, Any] = session.info.setdefault(MEMO_KEY, {})
    return memo


def batch_log(session: Session) -> dict[Any, Any]:
    """What this batch's succeeded units left for the units after them and the final step
    (a unit writes here only once nothing more can fail in it); emptied at the batch's end."""
    log: dict[Any, Any] = session.info.setdefault(LOG_KEY, {})
    return log


def batch_hints(session: Session) -> list[Any]:
    """The hints of this batch's units, in order (empty outside a batch)."""
    hints: list[Any] = session.info.get(HINTS_KEY, [])
    return hints


@dataclass(eq=False)
class _Unit:
    work: Callable[[Session], Any]
    final: Callable[[Session, list[Any]], None] | None = None
    savepoint: bool = True
    hint: Any = None
    woken: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future[Any] | None = None  # an awaiting coroutine's, on its loop
    ok: bool = False
    value: Any = None


class GroupCommit:
    """Batches run on a thread of their own, started on first use (and again in a forked
    child). Callers only queue a unit: a thread then sleeps on the unit's event, a coroutine
    awaits its future, so an async route costs no thread-pool round trip per request, and
    every caller is woken once, when its batch has committed."""

    def __init__(self, factory: sessionmaker[Session], max_batch: int = MAX_BATCH) -> None:
        self._factory = factory
        self._max_batch = max_batch
        self._queue: list[_Unit] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def run(
        self,
        work: Callable[[Session], T],
        final: Callable[[Session, list[T]], None] | None = None,
        *,
        savepoint: bool = True,
        hint: Any = None,
    ) -> T:
        """Run ``work(session)`` in a committed transaction, maybe shared with others; then,
        once per batch, ``final(session, results)`` with the results of the batch's units that
        succeeded and named this same step (a failure there fails the batch). Without a
        ``savepoint`` the work must raise before it writes anything (module docstring); ``hint``
        is shown to every unit of the batch through `batch_hints`."""
        unit = _Unit(work, final, savepoint, hint)
        self._put(unit)
        unit.woken.wait()
        if not unit.ok:
            raise unit.value
        return cast(T, unit.value)

    async def run_async(
        self,
        work: Callable[[Session], T],
        final: Callable[[Session, list[T]], None] | None = None,
        *,
        savepoint: bool = True,
        hint: Any = None,
    ) -> T:
        """`run` for a coroutine: the same batches, awaited instead of waited for."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._put(_Unit(work, final, savepoint, hint, future=future))
        # Shielded: a cancelled caller does not cancel a unit that may already be committed.
        return await asyncio.shield(future)

    def _put(self, unit: _Unit) -> None:
        with self._ready:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._serve, name="lethe-group-commit", daemon=True
                )
                self._thread.start()
            self._queue.append(unit)
            self._ready.notify()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
            self._run_batch()

    def _run_batch(self) -> None:
        with self._ready:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        try:
            try:
                outcomes = self._attempt(batch, None)
            except RetryBatch as retry:
                outcomes = self._attempt(batch, retry.prepare)
        except BaseException as exc:  # the commit (or a lock) failed: nothing is kept
            if isinstance(exc, RetryBatch):  # the locked attempt cannot be stale: a bug
                exc = RuntimeError(f"batch still stale under its locks: {exc}")
            self._finish(batch, [(False, exc)] * len(batch))
            if not isinstance(exc, Exception):
                raise
            return
        self._finish(batch, outcomes)

    def _attempt(
        self, batch: list[_Unit], prepare: Callable[[Session], None] | None
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        with transaction(self._factory) as session:
            if prepare is not None:
                prepare(session)
            session.info[HINTS_KEY] = [unit.hint for unit in batch if unit.hint is not None]
            for unit in batch:
                try:
                    if unit.savepoint:
                        with session.begin_nested():
                            outcomes.append((True, unit.work(session)))
                    else:
                        outcomes.append((True, unit.work(session)))
                except Exception as exc:  # this unit's savepoint is rolled back, not the batch
                    outcomes.append((False, exc))
                    if unit.savepoint:
                        session.info.pop(MEMO_KEY, None)
            finals: dict[Callable[[Session, list[Any]], None], list[Any]] = {}
            for unit, (ok, value) in zip(batch, outcomes, strict=True):
                if ok and unit.final is not None:
                    finals.setdefault(unit.final, []).append(value)
            for final, values in finals.items():
                final(session, values)
            for key in (MEMO_KEY, LOG_KEY, HINTS_KEY):
                session.info.pop(key, None)
        return outcomes

    @staticmethod
    def _finish(batch: list[_Unit], outcomes: list[tuple[bool, Any]]) -> None:
        awaited: dict[asyncio.AbstractEventLoop, list[_Unit]] = {}
        for unit, (ok, value) in zip(batch, outcomes, strict=True):
            unit.ok, unit.value = ok, value
            if unit.future is None:
                unit.woken.set()
            else:
                awaited.setdefault(unit.future.get_loop(), []).append(unit)
        for loop, units in awaited.items():  # one wake-up of each loop per batch
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve, units)


def _resolve(units: list[_Unit]) -> None:
    for unit in units:
        assert unit.future is not None
        if unit.future.cancelled():
            continue
        if unit.ok:
            unit.future.set_result(unit.value)
        else:
            unit.future.set_exception(unit.value)


_GROUPS: weakref.WeakKeyDictionary[Engine, GroupCommit] = weakref.WeakKeyDictionary()
_GROUPS_LOCK = threading.Lock()


def group_commit(factory: sessionmaker[Session]) -> GroupCommit:
    """The process's group for this factory's engine (one queue per database)."""
    engine: Engine = factory.kw["bind"]
    with _GROUPS_LOCK:
        group = _GROUPS.get(engine)
        if group is None:
            group = _GROUPS[engine] = GroupCommit(factory)
        return group
