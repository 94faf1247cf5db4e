"""A job whose attempts are exhausted names the worker of its last attempt, not an earlier one
(the claim path used to keep the error recorded when the first attempt was requeued)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from service.storage.db import transaction
from service.storage.tables import Job, utcnow
from tests.worker.harness import Stack, Trained, api_stack, stack_settings
from worker.context import Outcome, RunnerContext
from worker.job_queue import claim_job
from worker.reaper import Reaper
from worker.runner import run_job


@pytest.fixture
def stack(lethe_env: Path, database_url: str, storage_dir: Path) -> Iterator[Stack]:
    settings = stack_settings(database_url=database_url, storage_dir=storage_dir, max_attempts=2)
    with api_stack(settings) as s:
        yield s


def _expire(stack: Stack, job_id: str) -> None:
    # The holder stops renewing: its lease runs out (time, the one fault not worth waiting for).
    with transaction(stack.sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_exhausted_job_names_the_last_attempts_worker(stack: Stack, trained: Trained) -> None:
    from service.storage.objects import Storage

    model = stack.register(trained, "mlp")
    job_id = stack.submit(model, trained.train_ids[:4])
    ctx = {
        name: RunnerContext.from_settings(stack.settings, worker_id=f"{name}:1:x")
        for name in ("host-a", "host-b", "host-c")
    }
    assert claim_job(ctx["host-a"], job_id).attempt == 1
    _expire(stack, job_id)
    reaper = Reaper(
        stack.settings, stack.sessions, Storage.from_settings(stack.settings), actor="reaper"
    )
    reaper.tick()  # requeued, error: host-a's worker was lost
    assert "host-a" in stack.job(job_id)["error"]["detail"]
    assert claim_job(ctx["host-b"], job_id).attempt == 2
    _expire(stack, job_id)
    assert run_job(ctx["host-c"], job_id).outcome == Outcome.FAILED
    job = stack.job(job_id)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert "host-b" in job["error"]["detail"] and "host-a" not in job["error"]["detail"]
