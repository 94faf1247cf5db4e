"""The reaper: recovers jobs whose worker died and re-sends wake-ups that were lost.

It runs as a periodic check inside every worker's main process (a thread started by the Celery
worker, a step of the embedded executor's loop). Several reapers may run at once: every change
is a transaction that locks the model row and re-checks the condition, so only one wins.

Each tick:
1. Running jobs whose lease expired, or whose holder is provably dead (same host, pid gone),
   go back to `queued` with a "worker lost" error — or fail for good with the last error once
   `max_attempts` claims were made. Uncommitted checkpoint files of failed jobs are deleted.
2. Queued jobs with `cancel_requested` become `cancelled`.
3. Broker mode only: the queued head of each model's line gets a fresh message if it is still
   waiting after a grace period, then again with doubling intervals (capped). Redis may have
   lost its messages (restart without persistence), and a message for a blocked job is dropped
   by design; duplicates are harmless because claiming is idempotent. The first re-send comes
   `3 × reaper_interval_seconds` after the reaper first sees the job waiting, so a worker that
   starts after downtime picks up everything that was queued meanwhile.
4. Trust upkeep (service.trust: purge, retention, checkpoints): signed audit
   checkpoints every LETHE_CHECKPOINT_INTERVAL_S, abandoned temporary `.part` files older than
   LETHE_TEMP_MAX_AGE_S removed, finish content purges that an earlier
   save or promotion could not complete, and retire superseded checkpoints whose
   `LETHE_SUPERSEDED_RETENTION_S` has run out (and rejected ones). Both are idempotent and
   lock what they change, so concurrent reapers are harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased, sessionmaker

from service.domain.backoff import JITTER, backoff_delay
from service.domain.lines import line_head, lock_model
from service.domain.states import JobStatus
from service.settings import Settings
from service.storage.db import transaction
from service.storage.objects import Storage
from service.storage.tables import Job
from worker.errors import worker_lost_problem
from worker.job_queue import (
    cleanup_job_checkpoints,
    finish_job,
    lease_is_live,
    lock_job,
    release_members,
    retry_or_finish,
    runnable_jobs,
)

log = logging.getLogger("lethe.reaper")

MAX_RESEND_INTERVAL_S = 600.0


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)  # dataset ids
    retired: list[str] = field(default_factory=list)  # version ids
    swept: list[str] = field(default_factory=list)  # abandoned temporary files removed
    checkpoint_seq: int | None = None  # the signed audit checkpoint written this tick


@dataclass
class _Waiting:
    due: float
    sent: int = 0  # re-sends so far: the next interval doubles (service.domain.backoff)


class Reaper:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        storage: Storage,
        *,
        actor: str,
        enqueue: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.factory = session_factory
        self.storage = storage
        self.actor = actor
        self.enqueue = enqueue  # None in embedded mode: the executor polls the database
        self._waiting: dict[str, _Waiting] = {}
        self.first_resend_s = max(1.0, 3 * settings.reaper_interval_seconds)
        self._next_checkpoint = 0.0

    def tick(self) -> ReapReport:
        report = ReapReport()
        self._recover_running(report)
        self._cancel_queued(report)
        if self.enqueue is not None:
            self._resend(report)
        self._upkeep(report)
        return report

    # 4 ----------------------------------------------------------------------------------
    def _upkeep(self, report: ReapReport) -> None:
        from service.trust.purge import purge_pending
        from service.trust.retention import retire_due

        for result in purge_pending(self.factory, self.storage, actor=self.actor):
            if result.purged:
                report.purged.append(result.dataset_id)
        report.retired.extend(
            retire_due(self.factory, self.storage, self.settings, actor=self.actor)
        )
        self._checkpoint(report)
        report.swept = self.storage.sweep_temp(self.settings.temp_max_age_s)

    def _checkpoint(self, report: ReapReport) -> None:
        """A signed audit checkpoint every `checkpoint_interval_s` (the first on the first
        tick), so truncating the log is detectable even when no receipt was issued."""
        from service.trust.audit_checkpoints import write_checkpoint
        from service.trust.signing import load_signer

        now = time.monotonic()
        if now < self._next_checkpoint:
            return
        self._next_checkpoint = now + self.settings.checkpoint_interval_s
        try:
            written = write_checkpoint(self.factory, self.storage, load_signer(self.settings))
        except Exception:  # a broken chain is never signed; say so loudly, keep reaping
            log.exception("could not write a signed audit checkpoint")
            return
        report.checkpoint_seq = written["seq"] if written else None

    # 1 ----------------------------------------------------------------------------------
    def _recover_running(self, report: ReapReport) -> None:
        with transaction(self.factory) as session:
            # A job served by a coalesced run has no lease of its own: its leader's counts.
            rows = session.execute(
                select(Job.id, Job.model_id, Job.lease_expires_at, Job.worker_id).where(
                    Job.status == JobStatus.RUNNING, Job.served_by_job_id.is_(None)
                )
            ).all()
        for row in rows:
            if not lease_is_live(row.lease_expires_at, row.worker_id):
                self._recover_one(row.id, row.model_id, report)
        self._release_orphans()

    def _release_orphans(self) -> None:
        """Defensive: jobs still marked served by a run that is no longer running."""
        leader = aliased(Job)
        with transaction(self.factory) as session:
            rows = session.execute(
                select(Job.served_by_job_id, Job.model_id)
                .join(leader, leader.id == Job.served_by_job_id)
                .where(Job.status == JobStatus.RUNNING, leader.status != JobStatus.RUNNING)
                .distinct()
            ).all()
        for leader_id, model_id in rows:
            assert leader_id is not None  # the join matched it
            with transaction(self.factory) as session:
                lock_model(session, model_id)
                release_members(session, leader_id, actor=self.actor, reason="run not running")

    def _recover_one(self, job_id: str, model_id: str, report: ReapReport) -> None:
        outcome = None
        with transaction(self.factory) as session:
            lock_model(session, model_id)
            job = lock_job(session, job_id)
            if job is None or job.status != JobStatus.RUNNING:
                return
            if lease_is_live(job.lease_expires_at, job.worker_id):
                return  # renewed meanwhile
            # The attempt's error is that its worker vanished.
            final = retry_or_finish(
                session,
                job,
                actor=self.actor,
                max_attempts=self.settings.max_attempts,
                error=worker_lost_problem(job.worker_id),
                reason="lease expired",
            )
            outcome = str(final) if final is not None else "requeued"
            nxt = line_head(session, model_id) if outcome != "requeued" else job_id
        log.warning("job %s: worker lost, %s", job_id, outcome)
        getattr(report, outcome).append(job_id)
        if outcome in ("failed", "cancelled"):
            cleanup_job_checkpoints(self.storage, model_id, job_id)
        if nxt is not None:
            self._send(nxt, report)

    # 2 ----------------------------------------------------------------------------------
    def _cancel_queued(self, report: ReapReport) -> None:
        with transaction(self.factory) as session:
            rows = session.execute(
                select(Job.id, Job.model_id).where(
                    Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(True)
                )
            ).all()
        for row in rows:
            with transaction(self.factory) as session:
                lock_model(session, row.model_id)
                job = lock_job(session, row.id)
                if job is None or job.status != JobStatus.QUEUED or not job.cancel_requested:
                    continue
                finish_job(session, job, JobStatus.CANCELLED, actor=self.actor)
                nxt = line_head(session, row.model_id)
            report.cancelled.append(row.id)
            if nxt is not None:
                self._send(nxt, report)

    # 3 ----------------------------------------------------------------------------------
    def _resend(self, report: ReapReport) -> None:
        with transaction(self.factory) as session:
            heads = runnable_jobs(session)
        now = time.monotonic()
        for job_id in list(self._waiting):
            if job_id not in heads:
                del self._waiting[job_id]
        for job_id in heads:
            waiting = self._waiting.get(job_id)
            if waiting is None:
                self._waiting[job_id] = _Waiting(now + self.first_resend_s)
            elif now >= waiting.due:
                waiting.sent += 1
                waiting.due = now + backoff_delay(
                    waiting.sent,
                    base=self.first_resend_s,
                    cap=MAX_RESEND_INTERVAL_S,
                    jitter=JITTER,
                )
                self._send(job_id, report)

    def _send(self, job_id: str, report: ReapReport) -> None:
        if self.enqueue is None:
            return
        try:
            self.enqueue(job_id)
            report.resent.append(job_id)
        except Exception as exc:  # broker down: the next tick tries again
            log.warning("job %s: could not enqueue: %s", job_id, exc)


class ReaperThread(threading.Thread):
    """Runs `Reaper.tick` every `reaper_interval_seconds` until stopped."""

    def __init__(self, reaper: Reaper, interval: float) -> None:
        super().__init__(name="lethe-reaper", daemon=True)
        self.reaper = reaper
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.reaper.tick()
            except Exception as exc:  # database down: try again next tick
                log.warning("reaper tick failed: %s", exc)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)
