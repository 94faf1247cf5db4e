"""The job runner: claim → loading → influence → unlearning → evaluating → saving.

Plain functions over a session factory and a storage, with no Celery in sight: the Celery task
(`worker.tasks`) and the embedded executor (`worker.embedded`) call the same `run_job`.

Where each step lives:
- worker.job_queue — the claim (compare-and-swap under the model's row lock), per-model
  ordering, requeue, finish, the retry backoff;
- worker.execution — the phases of one attempt, progress and cancel checks, fencing via the
  lease monitor (worker.lease), and how an attempt ends;
- worker.loading — the job's inputs, checkpoint and datasets (with the process cache);
- worker.saving — the checkpoint file and the version, activated through the path shared
  with promotion (service.domain.activation).

This module is the entry point only: import the other names from their own modules.
"""

from __future__ import annotations

import logging

from service.logs import log_context
from worker.context import FINAL_OUTCOMES, Outcome, RunnerContext, RunResult
from worker.execution import Execution
from worker.job_queue import claim_job, wake_next

log = logging.getLogger("lethe.worker")

__all__ = ["run_job"]


def run_job(ctx: RunnerContext, job_id: str) -> RunResult:
    """Claim and run one job; safe to call for any job id, any number of times."""
    # Every line logged for this job carries its id, and once claimed the X-Request-ID of
    # the API request that created it (service.logs).
    with log_context(job_id=job_id):
        claim = claim_job(ctx, job_id)
        if claim.outcome is not None:
            result = RunResult(claim.outcome, job_id, detail=claim.detail)
        else:
            with log_context(request_id=claim.http_request_id):
                log.info("job %s: claimed (attempt %d) by %s", job_id, claim.attempt, ctx.worker_id)
                result = Execution(ctx, claim).run()
                log.info("job %s: %s %s", job_id, result.outcome.value, result.detail)
        # FINISHED too: a job cancelled while queued may have had jobs waiting behind it.
        if result.outcome in FINAL_OUTCOMES or result.outcome == Outcome.FINISHED:
            wake_next(ctx, claim.model_id)
    return result
