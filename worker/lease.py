"""Worker identity, job leases and the monitor thread that keeps a running job's lease alive.

A claimed job carries `worker_id` and `lease_expires_at`. While the job runs, a monitor thread
in the same process renews the lease every `heartbeat_seconds`, persists `phase`/`progress` at
most once a second, and polls `cancel_requested` so the job's progress callback can stop it.
Every write is fenced on (status, worker_id, attempts): a worker whose lease was taken over
writes nothing, notices it, and abandons the job.

`worker_id` is `<hostname>:<pid>:<pid-namespace>`. When a job's holder runs on this host, in
this pid namespace, and its pid no longer exists, the holder is certainly dead and the job can
be taken over at once instead of waiting for the lease to expire (SIGKILLed pool child,
restarted worker). A wrong guess (pid reuse, two hosts with one name) costs at most a wasted
attempt: the fence stops the original holder from saving a second result.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.domain.states import JobStatus
from service.storage.db import transaction
from service.storage.sql import affected_rows
from service.storage.tables import Job, utcnow

log = logging.getLogger("lethe.worker")

PROGRESS_MIN_INTERVAL_S = 1.0


def lease_until(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def _pid_namespace() -> str:
    try:
        return format(os.stat("/proc/self/ns/pid").st_ino, "x")
    except OSError:
        return "-"


def worker_identity(pid: int | None = None) -> str:
    return f"{socket.gethostname()}:{pid or os.getpid()}:{_pid_namespace()}"


def holder_is_dead(worker_id: str | None) -> bool:
    """True only when the holder is provably gone: same host and pid namespace, pid absent."""
    if not worker_id:
        return False
    host, _, rest = worker_id.partition(":")
    pid_text, _, namespace = rest.partition(":")
    if host != socket.gethostname() or namespace != _pid_namespace() or namespace == "-":
        return False
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    # A killed child that its parent has not reaped yet still answers kill(pid, 0).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def claim_terms(worker_id: str, attempt: int) -> dict[str, Any]:
    """The fence, defined once: the job is running under this worker and this attempt
    (`fenced` says it in SQL, `job_queue.Fence.holds` of a loaded row)."""
    return {"status": JobStatus.RUNNING, "worker_id": worker_id, "attempts": attempt}


def fenced(job_id: str, worker_id: str, attempt: int) -> ColumnElement[bool]:
    """WHERE clause: the job is still running under this worker's claim."""
    terms = claim_terms(worker_id, attempt).items()
    return and_(Job.id == job_id, *(getattr(Job, name) == value for name, value in terms))


class JobMonitor(threading.Thread):
    """Heartbeat + progress persistence + cancel polling for one running job."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        job_id: str,
        worker_id: str,
        attempt: int,
        lease_seconds: float,
        heartbeat_seconds: float,
    ) -> None:
        super().__init__(name=f"lethe-monitor-{job_id[:8]}", daemon=True)
        # The creator's log ids (job, request): a new thread starts with an empty context.
        self._log_context = contextvars.copy_context()
        self._factory = factory
        self.job_id = job_id
        self.worker_id = worker_id
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = min(heartbeat_seconds, lease_seconds / 2)
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()  # the fence failed: someone else owns the job now
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._progress = 0.0
        self._dirty = False
        self._last_progress_write = 0.0
        self._last_renew = time.monotonic()

    # Called from the job thread.
    def report(self, phase: str, progress: float) -> None:
        with self._lock:
            if phase != self._phase or abs(progress - self._progress) > 1e-9:
                self._phase, self._progress, self._dirty = phase, progress, True

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)

    def run(self) -> None:
        self._log_context.run(self._watch)

    def _watch(self) -> None:
        tick = min(PROGRESS_MIN_INTERVAL_S, self.heartbeat_seconds)
        while not self._stop_event.wait(tick):
            try:
                self._tick()
            except Exception as exc:  # the database may be briefly unreachable: keep trying
                log.warning("job %s: heartbeat failed: %s", self.job_id, exc)

    def _tick(self) -> None:
        now = time.monotonic()
        values: dict[str, object] = {}
        with self._lock:
            since = now - self._last_progress_write
            progress_due = self._dirty and since >= PROGRESS_MIN_INTERVAL_S
            if progress_due:
                values.update(phase=self._phase, progress=self._progress)
        if now - self._last_renew >= self.heartbeat_seconds:
            values["lease_expires_at"] = lease_until(self.lease_seconds)
        with transaction(self._factory) as session:
            if values:
                renewed = affected_rows(
                    session,
                    update(Job)
                    .where(fenced(self.job_id, self.worker_id, self.attempt))
                    .values(**values)
                    .execution_options(synchronize_session=False),
                )
                if renewed == 0:
                    self.lost.set()
                    self._stop_event.set()
                    return
            cancel = session.execute(
                select(Job.cancel_requested).where(Job.id == self.job_id)
            ).scalar_one_or_none()
        if values:
            if "lease_expires_at" in values:
                self._last_renew = now
            if progress_due:
                with self._lock:
                    self._last_progress_write = now
                    if (self._phase, self._progress) == (values["phase"], values["progress"]):
                        self._dirty = False
        if cancel:
            self.cancel_requested.set()
