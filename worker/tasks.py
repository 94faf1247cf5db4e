"""Celery task `lethe.run_job`: one delivery of one job id, handled by worker.runner.

Whatever the message says, the database decides: a duplicate or stale delivery (job finished,
running elsewhere, waiting behind an earlier job of its model) is acknowledged and dropped.
A transient failure puts the job back to `queued` and re-sends it with a backoff countdown.
If the database cannot even be reached to claim the job, the message is retried with backoff a
bounded number of times; after that the reaper's wake-ups take over.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from service.domain.backoff import backoff_delay
from service.domain.queue import RUN_JOB_TASK
from worker.celery_app import app, enqueue
from worker.context import Outcome, RunnerContext
from worker.errors import is_transient
from worker.runner import run_job

log = logging.getLogger("lethe.worker")

_contexts: dict[int, RunnerContext] = {}
MAX_CLAIM_RETRIES = 20


def runner_context() -> RunnerContext:
    """One context per process (created in the pool child, after fork)."""
    pid = os.getpid()
    ctx = _contexts.get(pid)
    if ctx is None:
        _contexts.clear()
        ctx = RunnerContext.from_settings(app.conf.lethe_settings, wake=enqueue)
        _contexts[pid] = ctx
    return ctx


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job_task(self: Any, job_id: str) -> dict[str, Any]:
    try:
        result = run_job(runner_context(), job_id)
    except Exception as exc:
        retries = self.request.retries or 0
        if not is_transient(exc):  # a bug: the same message would fail the same way
            log.exception("job %s: could not be handled; not retrying the message", job_id)
            return {"outcome": "error", "job_id": job_id, "detail": repr(exc)[:2000]}
        if retries >= MAX_CLAIM_RETRIES:
            log.error("job %s: giving up on this message: %s", job_id, exc)
            return {"outcome": "error", "job_id": job_id, "detail": str(exc)}
        log.warning("job %s: could not be handled (%s); retrying the message", job_id, exc)
        raise self.retry(exc=exc, countdown=backoff_delay(retries), max_retries=None) from exc
    if result.outcome == Outcome.RETRY and result.retry_in is not None:
        enqueue(job_id, countdown=result.retry_in)
    return result.as_dict()
