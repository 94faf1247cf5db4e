"""Who retries what (worker/tasks.py's docstring): a delivery that meets a transient fault is
retried by Celery itself (autoretry_for, retry_backoff, retry_jitter), a bug is not, and the
service's own backoff spreads retries with jitter. The Celery task runs eagerly here (the
real task object and its retry machinery, no broker); the database fault is a mock because
the point is the task's retry policy, tested with real Celery elsewhere (test_recovery)."""

from __future__ import annotations

import pytest

from service.domain.backoff import JITTER, backoff_delay


@pytest.fixture
def task(monkeypatch: pytest.MonkeyPatch):
    from worker import tasks

    monkeypatch.setattr(tasks, "runner_context", lambda: None)
    tasks.app.conf.task_always_eager = True
    try:
        yield tasks
    finally:
        tasks.app.conf.task_always_eager = False


def test_a_transient_fault_is_retried_by_celery_until_it_passes(task, monkeypatch) -> None:
    from worker.context import Outcome, RunResult

    calls: list[str] = []

    def flaky(_ctx, job_id: str) -> RunResult:
        calls.append(job_id)
        if len(calls) < 3:
            raise ConnectionRefusedError("database not reachable")
        return RunResult(Outcome.FINISHED, job_id)

    monkeypatch.setattr(task, "run_job", flaky)
    result = task.run_job_task.apply(args=("job-1",))
    assert result.successful() and result.get()["outcome"] == "finished"
    assert calls == ["job-1"] * 3
    opts = task.run_job_task
    assert opts.autoretry_for == (task.TransientDelivery,)
    assert opts.retry_backoff is True and opts.retry_jitter is True
    assert opts.max_retries == task.MAX_CLAIM_RETRIES


def test_a_bug_is_not_retried(task, monkeypatch) -> None:
    calls: list[str] = []

    def broken(_ctx, job_id: str):
        calls.append(job_id)
        raise KeyError("a bug")

    monkeypatch.setattr(task, "run_job", broken)
    result = task.run_job_task.apply(args=("job-2",))
    assert result.get()["outcome"] == "error" and calls == ["job-2"]


def test_jittered_backoff_spreads_retries() -> None:
    delays = [backoff_delay(3, jitter=JITTER) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays)  # between half and all of 2**3
    assert max(delays) - min(delays) > 2.0  # not one value: retries of an outage spread out
    assert backoff_delay(3) == 8.0  # no jitter asked: exact
