"""Celery task `lethe.run_job`: one delivery of one job id, handled by worker.runner.

Whatever the message says, the database decides: a duplicate or stale delivery (job finished,
running elsewhere, waiting behind an earlier job of its model) is acknowledged and dropped.
A transient failure puts the job back to `queued` and re-sends it with a backoff countdown.
If the database cannot even be reached to claim the job, Celery retries the message
(`autoretry_for`, exponential `retry_backoff` with `retry_jitter`) a bounded number of times;
after that the reaper's wake-ups take over.

Which layer handles which fault:
- the worker process dies mid-job: the broker redelivers the unacknowledged message
  (`acks_late`, `reject_on_worker_lost`), and the reaper re-queues a job whose holder is gone
  or whose lease expired (worker/reaper.py);
- the database is unreachable when a message arrives: Celery's autoretry, here;
- a job attempt fails transiently (storage, database mid-run): the job goes back to `queued`
  with a jittered backoff and a new message with that countdown (worker/execution.py,
  job_queue.retry_delay), at most LETHE_MAX_ATTEMPTS attempts;
- a message is lost (broker restart without persistence, a wake-up nobody heard): the
  reaper re-sends the head of each model's line with jittered, growing intervals;
- the embedded executor (no broker) polls and retries its loop with tenacity's jittered
  exponential waits (worker/embedded.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any

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


class TransientDelivery(Exception):
    """This delivery met a fault that may pass (the database unreachable at claim time)."""


@app.task(
    name=RUN_JOB_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(TransientDelivery,),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=MAX_CLAIM_RETRIES,
)
def run_job_task(self: Any, job_id: str) -> dict[str, Any]:
    try:
        result = run_job(runner_context(), job_id)
    except Exception as exc:
        if not is_transient(exc):  # a bug: the same message would fail the same way
            log.exception("job %s: could not be handled; not retrying the message", job_id)
            return {"outcome": "error", "job_id": job_id, "detail": repr(exc)[:2000]}
        log.warning("job %s: could not be handled (%s); retrying the message", job_id, exc)
        raise TransientDelivery(f"job {job_id}: {exc}") from exc
    if result.outcome == Outcome.RETRY and result.retry_in is not None:
        enqueue(job_id, countdown=result.retry_in)
    return result.as_dict()
