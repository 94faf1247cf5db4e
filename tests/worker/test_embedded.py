"""Embedded mode: no broker, SQLite, `python -m worker.embedded` fed from the database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.domain.queue import EmbeddedQueue, get_queue
from service.trust.audit import verify_chain
from tests.worker.harness import (
    Trained,
    WorkerProcess,
    api_stack,
    assert_chains,
    job_checkpoint_files,
    settings_env,
    stack_settings,
    wait_until,
)

SLOW = {
    "calibration": "off",
    "epochs": 300,
    "top_data": 1.0,
    "batch_size": 1,
    "backbone_mode": "train",
    "lr": 1e-5,
}


@pytest.mark.slow
def test_embedded_end_to_end_with_shutdown_and_crash(
    lethe_env: Path, sqlite_url: str, storage_dir: Path, trained: Trained, tmp_path: Path
) -> None:
    settings = stack_settings(database_url=sqlite_url, storage_dir=storage_dir)
    assert settings.embedded and isinstance(get_queue(settings), EmbeddedQueue)
    log = tmp_path / "executor.log"
    with api_stack(settings) as stack:
        model = stack.register(trained, "mlp")
        other = stack.register(trained, "cnn")
        # Queued while nothing runs: picked up when the executor starts.
        jobs = [
            stack.submit(model, trained.train_ids[:8], params=SLOW),
            stack.submit(other, trained.train_ids[:8]),
            stack.submit(model, trained.train_ids[8:16]),
        ]
        executor = WorkerProcess.embedded(settings, log).start()
        try:
            # SIGTERM mid-job: the job is handed back (no attempt spent) and the process exits 0.
            wait_until(
                lambda: stack.job_rows(jobs)[jobs[0]].status == "running",
                timeout=60,
                what="the first job to run",
            )
            stopped_at = time.monotonic()
            executor.signal(signal.SIGTERM)
            assert executor.proc is not None
            assert executor.proc.wait(timeout=30) == 0, executor.log_text()[-3000:]
            assert time.monotonic() - stopped_at < 25
            row = stack.job_rows(jobs)[jobs[0]]
            assert (row.status, row.attempts, row.result_version_id) == ("queued", 0, None)
            assert job_checkpoint_files(storage_dir) == []

            executor.start()
            done = stack.wait(jobs, timeout=120)
            statuses = {d["status"] for d in done.values()}
            assert statuses == {"succeeded"}, executor.log_text()[-3000:]
            assert done[jobs[0]]["attempts"] == 1

            # SIGKILL mid-job: the next executor sees the holder's pid gone and re-runs it.
            crash = stack.submit(model, trained.train_ids[16:24], params=SLOW)
            wait_until(
                lambda: stack.job_rows([crash])[crash].status == "running",
                timeout=60,
                what="the crash job to run",
            )
            executor.kill_group()
            executor.start()
            done.update(stack.wait([crash], timeout=120))
        finally:
            code = executor.stop()
        assert code == 0, executor.log_text()[-3000:]
        assert done[crash]["status"] == "succeeded" and done[crash]["attempts"] == 2
        assert_chains(stack, model, [jobs[0], jobs[2], crash])
        assert_chains(stack, other, [jobs[1]])
        files = job_checkpoint_files(storage_dir)
        # One per model (its active version: superseded ones are retired at once), nothing
        # from the killed attempt.
        assert len(files) == 2
        with stack.sessions() as session:
            assert verify_chain(session)["ok"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # reparented and not reaped yet: a zombie has exited all the same
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_executor_exits_when_its_parent_dies(
    lethe_env: Path, sqlite_url: str, storage_dir: Path
) -> None:
    from service.storage import migrate

    settings = stack_settings(database_url=sqlite_url, storage_dir=storage_dir)
    migrate.upgrade(settings.db_url)
    parent = subprocess.Popen(
        ["bash", "-c", f"'{sys.executable}' -m worker.embedded & echo $!; wait"],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        time.sleep(2.0)  # let it start polling
        assert not _gone(pid)
        parent.kill()
        parent.wait(timeout=10)
        wait_until(lambda: _gone(pid), timeout=20, what="the orphaned executor to exit")
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_lethe_worker_without_a_broker_runs_the_embedded_executor(
    lethe_env: Path, sqlite_url: str, storage_dir: Path, trained: Trained, tmp_path: Path
) -> None:
    from service.devtools.localserver import lethe_command

    settings = stack_settings(database_url=sqlite_url, storage_dir=storage_dir)
    with api_stack(settings) as stack:
        model = stack.register(trained, "mlp")
        job_id = stack.submit(model, trained.train_ids[:5])
        worker = WorkerProcess(
            lethe_command("worker"), settings_env(settings), tmp_path / "worker.log"
        ).start()
        try:
            done = stack.wait([job_id], timeout=120)[job_id]
        finally:
            code = worker.stop()
    assert done["status"] == "succeeded", worker.log_text()[-2000:]
    assert code == 0
    assert "embedded executor started" in worker.log_text()
