"""Infrastructure faults: the broker restarting with jobs queued, the database going away at
the save step."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url

from service.storage.db import transaction
from service.storage.tables import Job, utcnow
from tests.conftest import PG_ADMIN_URL
from tests.worker.harness import (
    ONE_JOB_PER_REQUEST,
    Stack,
    Trained,
    WorkerProcess,
    api_stack,
    assert_chains,
    job_checkpoint_files,
    stack_settings,
    wait_until,
)
from tests.worker.redis_server import ThrowawayRedis
from worker.context import Outcome, RunnerContext
from worker.reaper import Reaper
from worker.runner import run_job

pytestmark = [pytest.mark.postgres]


@pytest.mark.slow
def test_jobs_queued_across_a_redis_restart_still_run(
    lethe_env: Path,
    postgres_url: str,
    storage_dir: Path,
    private_redis: ThrowawayRedis,
    trained: Trained,
    tmp_path: Path,
) -> None:
    settings = stack_settings(
        database_url=postgres_url,
        storage_dir=storage_dir,
        broker_url=private_redis.url,
        **ONE_JOB_PER_REQUEST,  # the version chain below is one version per request
    )
    with api_stack(settings) as stack:
        model = stack.register(trained, "mlp")
        other = stack.register(trained, "cnn")
        worker = WorkerProcess.celery(settings, tmp_path / "worker.log").start()
        try:
            wait_until(lambda: "ready" in worker.log_text(), timeout=60, what="worker ready")
            slow = {
                "calibration": "off",
                "epochs": 100,
                "top_data": 1.0,
                "batch_size": 1,
                "backbone_mode": "train",
                "lr": 1e-5,
            }
            job_ids = [stack.submit(model, trained.train_ids[:5], params=slow)]
            wait_until(
                lambda: stack.job_rows(job_ids)[job_ids[0]].status == "running",
                timeout=60,
                what="the first job to run",
            )
            # The other model's head is sent a message, which waits in Redis while the only
            # pool child is busy; the jobs behind a head get none (service.domain.lines).
            other_ids = [
                stack.submit(other, trained.train_ids[20 + i * 5 : 25 + i * 5]) for i in range(2)
            ]
            job_ids += [
                stack.submit(model, trained.train_ids[i * 5 : (i + 1) * 5], params=slow)
                for i in range(1, 4)
            ]
            client = redis.Redis.from_url(private_redis.url)
            queued_before = client.llen(settings.queue_name)
            run_before = client.info("server")["run_id"]
            client.close()
            private_redis.stop()  # no persistence: the queued messages are gone
            time.sleep(1.0)
            private_redis.start()
            # A new server process that keeps nothing on disk started empty. (Counting the
            # queue now would race the reaper, which re-dispatches every 0.5 s.)
            client = redis.Redis.from_url(private_redis.url)
            lost = client.info("server")["run_id"] != run_before and client.config_get("save") == {
                "save": ""
            }
            client.close()
            done = stack.wait(job_ids + other_ids, timeout=120)
            # Second round: nothing runs, so no completion can hand the line on — jobs
            # queued while the worker is down and Redis restarts are found by the reaper.
            worker.stop()
            more = [
                stack.submit(model, trained.train_ids[40 + i * 5 : 45 + i * 5]) for i in range(2)
            ]
            private_redis.stop()
            private_redis.start()
            worker.start()
            done.update(stack.wait(more, timeout=120))
        finally:
            worker.stop()
    assert queued_before >= 1 and lost  # there really were messages, and they really were lost
    assert {d["status"] for d in done.values()} == {"succeeded"}, worker.log_text()[-3000:]
    assert_chains(stack, model, job_ids + more)
    assert_chains(stack, other, other_ids)


def _set_connections(db_name: str, allowed: bool) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                text(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            )
            if not allowed:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": db_name},
                )
    finally:
        admin.dispose()


def test_database_unreachable_at_save_retries_without_half_updates(
    lethe_env: Path, postgres_url: str, storage_dir: Path, trained: Trained
) -> None:
    """The fault is real (PostgreSQL refuses every connection and drops the open ones); only
    its timing is injected, through the runner's `before_save` hook, because no outside
    observer can hit the few milliseconds between writing the checkpoint and committing."""
    settings = stack_settings(database_url=postgres_url, storage_dir=storage_dir)
    db_name = make_url(postgres_url).database
    assert db_name
    with api_stack(settings) as stack:
        model = stack.register(trained, "mlp")
        keys = trained.train_ids[:6]
        job_id = stack.submit(model, keys)
        ctx = RunnerContext.from_settings(settings)
        seen_file: list[list[str]] = []

        def cut_database(_jid: str) -> None:
            seen_file.append(job_checkpoint_files(storage_dir))  # written, not yet committed
            _set_connections(db_name, allowed=False)

        ctx.hooks["before_save"] = cut_database
        try:
            result = run_job(ctx, job_id)
        finally:
            _set_connections(db_name, allowed=True)
        assert result.outcome == Outcome.RETRY
        assert len(seen_file[0]) == 1  # the checkpoint had been written...
        assert job_checkpoint_files(storage_dir) == []  # ...and was removed: no orphan
        # Nothing half-written: still one active version 1, records present, job unfinished.
        _assert_untouched(stack, model, keys, job_id)

        # The lease runs out (the attempt could not even record its error); the reaper
        # re-queues the job and the next attempt succeeds.
        ctx.hooks.clear()
        with transaction(stack.sessions) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )
        reaper = Reaper(settings, stack.sessions, ctx.storage, actor="worker:test")
        assert reaper.tick().requeued == [job_id]
        assert run_job(ctx, job_id).outcome == Outcome.SUCCEEDED
        job = stack.job(job_id)
        assert job["attempts"] == 2 and job["status"] == "succeeded"
        assert_chains(stack, model, [job_id])
        assert len(job_checkpoint_files(storage_dir)) == 1


def _assert_untouched(stack: Stack, model: str, keys: list[str], job_id: str) -> None:
    versions = stack.versions(model)
    assert [(v["number"], v["status"]) for v in versions] == [(1, "active")]
    assert set(stack.record_states(stack.models[model], keys).values()) == {"present"}
    row = stack.job_rows([job_id])[job_id]
    assert row.status == "running" and row.result_version_id is None
