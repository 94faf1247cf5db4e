"""The job runner in-process (no Celery): claims, ordering, fencing, retries, the reaper —
on SQLite and PostgreSQL, with jobs submitted through the real API."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from service.storage.db import transaction
from service.storage.tables import Job, Record, utcnow
from tests.worker.harness import (
    ONE_JOB_PER_REQUEST,
    Stack,
    Trained,
    api_stack,
    assert_chains,
    job_checkpoint_files,
    stack_settings,
)
from worker.context import Outcome, RunnerContext
from worker.execution import Execution
from worker.job_queue import claim_job
from worker.lease import worker_identity
from worker.reaper import Reaper
from worker.runner import run_job


@pytest.fixture
def stack(lethe_env: Path, database_url: str, storage_dir: Path, request) -> Iterator[Stack]:
    overrides = getattr(request, "param", {})
    settings = stack_settings(database_url=database_url, storage_dir=storage_dir, **overrides)
    with api_stack(settings) as s:
        yield s


def _ctx(stack: Stack, worker_id: str | None = None) -> RunnerContext:
    return RunnerContext.from_settings(stack.settings, worker_id=worker_id)


def _files(stack: Stack) -> list[str]:
    return job_checkpoint_files(Path(stack.settings.storage))


@pytest.mark.parametrize("stack", [ONE_JOB_PER_REQUEST], indirect=True)
def test_duplicate_deliveries_ordering_and_takeover_fence(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    first = stack.submit(model, trained.train_ids[:6])
    second = stack.submit(model, trained.train_ids[6:12])
    a, b = _ctx(stack, "host-a:1:x"), _ctx(stack, "host-b:2:y")

    # The later job cannot start before the earlier one has finished.
    assert run_job(b, second).outcome == Outcome.BLOCKED
    claim_a = claim_job(a, first)
    assert claim_a.outcome is None and claim_a.attempt == 1
    # A second delivery while A holds a live lease does nothing.
    assert run_job(b, first).outcome == Outcome.BUSY
    assert run_job(b, second).outcome == Outcome.BLOCKED
    # A stops renewing; B takes over once the lease has expired and finishes the job.
    with transaction(stack.sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == first)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    result_b = run_job(b, first)
    assert result_b.outcome == Outcome.SUCCEEDED
    # A wakes up and tries to finish its stale attempt: the fence stops it, no second version.
    stale = Execution(a, claim_a).run()
    assert stale.outcome == Outcome.LOST
    assert run_job(a, first).outcome == Outcome.FINISHED
    assert run_job(a, second).outcome == Outcome.SUCCEEDED
    assert_chains(stack, model, [first, second])
    job = stack.job(first)
    assert job["attempts"] == 2 and job["status"] == "succeeded"
    # Only the active version's checkpoint remains: the stale attempt's file was deleted, and
    # version 2 (first's) was retired once version 3 superseded it (retention 0 s).
    assert len(_files(stack)) == 1 and second in _files(stack)[0]
    assert stack.versions(model)[1]["retired_at"] is not None


def test_transient_error_requeues_and_the_retry_succeeds(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    job_id = stack.submit(model, trained.train_ids[:6])
    ctx = _ctx(stack)
    calls = []

    def flaky_storage(jid: str) -> None:
        calls.append(jid)
        if len(calls) == 1:
            raise OSError("storage briefly unavailable")

    ctx.hooks["before_save"] = flaky_storage
    result = run_job(ctx, job_id)
    assert result.outcome == Outcome.RETRY and result.retry_in and result.retry_in > 0
    job = stack.job(job_id)
    assert job["status"] == "queued" and job["attempts"] == 1
    assert job["error"]["type"].endswith("/job-attempt-failed")
    assert "storage briefly unavailable" in job["error"]["detail"]
    assert [v["number"] for v in stack.versions(model)] == [1]
    assert _files(stack) == []  # the written checkpoint was removed
    assert run_job(ctx, job_id).outcome == Outcome.SUCCEEDED
    job = stack.job(job_id)
    assert job["attempts"] == 2 and job["error"] is None
    assert_chains(stack, model, [job_id])


@pytest.mark.parametrize("stack", [{"max_attempts": 2}], indirect=True)
def test_attempts_exhausted_fail_with_the_last_error(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    job_id = stack.submit(model, trained.train_ids[:6])
    later = stack.submit(model, trained.train_ids[6:12])
    ctx = _ctx(stack)
    woken: list[str] = []
    ctx.wake = woken.append
    counter = iter(range(100))

    def always_failing(_jid: str) -> None:
        raise ConnectionError(f"object store down #{next(counter)}")

    ctx.hooks["before_save"] = always_failing
    assert run_job(ctx, job_id).outcome == Outcome.RETRY
    assert run_job(ctx, job_id).outcome == Outcome.FAILED
    job = stack.job(job_id)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert "object store down #1" in job["error"]["detail"]  # the last error, not the first
    request = stack.client.get(
        f"/v1/deletion-requests/{job['request_id']}", headers=stack.headers
    ).json()
    assert request["status"] == "failed"
    assert woken == [later]  # the model's next job is handed on at once
    assert _files(stack) == []
    assert [v["status"] for v in stack.versions(model)] == ["active"]


def test_a_bug_fails_the_job_at_once_with_its_traceback(stack: Stack, trained: Trained) -> None:
    """A plain bug (here a KeyError where a job saves) would fail the same way every time:
    no retry, the job failed on its first attempt, the traceback in its error."""
    model = stack.register(trained, "mlp")
    job_id = stack.submit(model, trained.train_ids[:6])
    ctx = _ctx(stack)

    def buggy_code(_jid: str) -> None:
        {}["no-such-field"]

    ctx.hooks["before_save"] = buggy_code
    assert run_job(ctx, job_id).outcome == Outcome.FAILED
    job = stack.job(job_id)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["type"].endswith("/internal-error") and job["error"]["status"] == 500
    assert "KeyError: 'no-such-field'" in job["error"]["detail"]
    assert "buggy_code" in job["error"]["traceback"] and "Traceback" in job["error"]["traceback"]
    assert _files(stack) == []  # the written checkpoint was removed
    assert [v["status"] for v in stack.versions(model)] == ["active"]


def test_missing_record_fails_at_once_with_the_key(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    keys = trained.train_ids[:4]
    job_id = stack.submit(model, keys)
    with transaction(stack.sessions) as session:  # forgotten behind the API's back
        session.execute(update(Record).where(Record.key == keys[2]).values(state="forgotten"))
    result = run_job(_ctx(stack), job_id)
    assert result.outcome == Outcome.FAILED
    job = stack.job(job_id)
    assert job["attempts"] == 1
    assert job["error"]["type"].endswith("/records-unavailable")
    assert job["error"]["errors"] == [{"key": keys[2], "reason": "already forgotten"}]
    assert [v["number"] for v in stack.versions(model)] == [1]


@pytest.mark.parametrize("stack", [{"max_attempts": 2}], indirect=True)
def test_reaper_requeues_dead_and_expired_holders_then_gives_up(
    stack: Stack, trained: Trained
) -> None:
    model = stack.register(trained, "mlp")
    job_id = stack.submit(model, trained.train_ids[:6])
    sent: list[str] = []
    reaper = Reaper(
        stack.settings,
        stack.sessions,
        _ctx(stack).storage,
        actor="worker:reaper",
        enqueue=sent.append,
    )
    # A holder on this host whose process has exited: recovered at once, lease or not.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_id = worker_identity(int(dead.stdout))
    assert claim_job(_ctx(stack, dead_id), job_id).outcome is None
    report = reaper.tick()
    assert report.requeued == [job_id] and sent == [job_id]
    job = stack.job(job_id)
    assert job["status"] == "queued" and job["error"]["type"].endswith("/worker-lost")
    # A live-looking holder elsewhere is left alone until its lease runs out...
    assert claim_job(_ctx(stack, "elsewhere:1:z"), job_id).outcome is None
    assert reaper.tick().requeued == []
    with transaction(stack.sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    # ...then, with max_attempts (2) claims spent, the job fails for good.
    report = reaper.tick()
    assert report.failed == [job_id]
    job = stack.job(job_id)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert job["error"]["type"].endswith("/worker-lost")
    assert [v["number"] for v in stack.versions(model)] == [1]


def test_reaper_resends_a_waiting_head_with_backoff(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    first = stack.submit(model, trained.train_ids[:3])
    stack.submit(model, trained.train_ids[3:6])  # behind `first`: never resent while it waits
    sent: list[str] = []
    reaper = Reaper(
        stack.settings,
        stack.sessions,
        _ctx(stack).storage,
        actor="worker:reaper",
        enqueue=sent.append,
    )
    reaper.first_resend_s = 0.2
    reaper.tick()
    assert sent == []  # first sight: the original message may still be on its way
    time.sleep(0.25)
    reaper.tick()
    assert sent == [first]
    reaper.tick()
    assert sent == [first]  # the interval doubled


def test_cancel_seen_at_save_leaves_nothing_behind(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    keys = trained.train_ids[:6]
    job_id = stack.submit(model, keys)
    ctx = _ctx(stack)

    def cancel_now(jid: str) -> None:  # the API's cancel arrives while the file is written
        assert stack.cancel(jid).status_code == 202

    ctx.hooks["before_save"] = cancel_now
    assert run_job(ctx, job_id).outcome == Outcome.CANCELLED
    job = stack.job(job_id)
    assert job["status"] == "cancelled" and job["result_version_id"] is None
    assert [v["number"] for v in stack.versions(model)] == [1]
    assert set(stack.record_states(stack.models[model], keys).values()) == {"present"}
    assert _files(stack) == []


def test_soft_time_limit_fails_without_retry(stack: Stack, trained: Trained) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    model = stack.register(trained, "mlp")
    job_id = stack.submit(model, trained.train_ids[:6])
    ctx = _ctx(stack)

    def too_slow(_jid: str) -> None:
        raise SoftTimeLimitExceeded()

    ctx.hooks["before_save"] = too_slow
    assert run_job(ctx, job_id).outcome == Outcome.FAILED
    job = stack.job(job_id)
    assert job["attempts"] == 1 and job["error"]["type"].endswith("/time-limit")
    assert _files(stack) == []


@pytest.mark.parametrize("stack", [ONE_JOB_PER_REQUEST], indirect=True)
def test_the_next_jobs_before_reuses_the_released_after(stack: Stack, trained: Trained) -> None:
    """Job 2 starts from the version job 1 released in this process: its "before" passes only
    the sets job 1's "after" did not score, with the same numbers a fresh pass gives."""
    from worker.released_outputs import forget_all

    forget_all()  # nothing carried from other tests in this process
    model = stack.register(trained, "mlp")
    ctx = _ctx(stack)
    first = stack.submit(model, trained.train_ids[:6])
    assert run_job(ctx, first).outcome == Outcome.SUCCEEDED
    second = stack.submit(model, trained.train_ids[6:12])
    assert run_job(ctx, second).outcome == Outcome.SUCCEEDED
    one, two = stack.job(first)["metrics"], stack.job(second)["metrics"]
    assert one["before"]["sets_carried"] == 0
    assert two["before"]["sets_carried"] >= 2  # at least the eval set and the member sample
    assert two["before"]["forward_passes"] < one["before"]["forward_passes"]
    assert two["before"]["eval_acc"] == one["after"]["eval_acc"]
    assert two["before"]["per_class_acc"] == one["after"]["per_class_acc"]
    # A process that did not release version 2 computes the same "before" from scratch.
    forget_all()
    third = stack.submit(model, trained.train_ids[12:18])
    assert run_job(ctx, third).outcome == Outcome.SUCCEEDED
    three = stack.job(third)["metrics"]
    assert three["before"]["sets_carried"] == 0
    assert three["before"]["eval_acc"] == two["after"]["eval_acc"]
