"""Jobs through the real API, a real Redis broker, real `lethe worker` (Celery prefork)
subprocesses and a real PostgreSQL database."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.trust.audit import verify_chain
from tests.worker.harness import (
    ONE_JOB_PER_REQUEST,
    Stack,
    Trained,
    WorkerProcess,
    api_stack,
    assert_chains,
    job_checkpoint_files,
    settings_env,
    stack_settings,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

# ~1-3 s of unlearning on 10 digits with the MLP: long enough to be caught mid-job.
LONG_IMU = {
    "calibration": "off",
    "epochs": 300,
    "top_data": 1.0,
    "batch_size": 1,
    "backbone_mode": "train",
    "lr": 1e-5,
}


@pytest.fixture
def broker_stack(
    lethe_env: Path, postgres_url: str, redis_url: str, storage_dir: Path, request
) -> Iterator[Stack]:
    overrides = getattr(request, "param", {})
    settings = stack_settings(
        database_url=postgres_url, storage_dir=storage_dir, broker_url=redis_url, **overrides
    )
    with api_stack(settings) as stack:
        yield stack


@pytest.fixture
def worker_log(tmp_path: Path) -> Path:
    return tmp_path / "worker.log"


def _start_worker(stack: Stack, log: Path, via_cli: bool = True) -> WorkerProcess:
    proc = WorkerProcess.celery(stack.settings, log, via_cli=via_cli).start()
    return proc


def _versions_by_job(stack: Stack) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in stack.all_versions():
        if v.job_id:
            counts[v.job_id] = counts.get(v.job_id, 0) + 1
    return counts


def _no_orphans(stack: Stack) -> None:
    storage = Path(stack.settings.storage)
    # Superseded versions are retired (retention 0 s): their storage_key is None, file gone.
    kept = {v.storage_key for v in stack.all_versions() if v.job_id and v.storage_key}
    assert set(job_checkpoint_files(storage)) == kept


@pytest.mark.slow
@pytest.mark.parametrize("broker_stack", [ONE_JOB_PER_REQUEST], indirect=True)
def test_twenty_jobs_over_two_models_run_in_submission_order(
    broker_stack: Stack, trained: Trained, worker_log: Path
) -> None:
    stack = broker_stack
    mlp = stack.register(trained, "mlp")
    cnn = stack.register(trained, "cnn")
    worker = _start_worker(stack, worker_log)
    try:
        # 20 submissions at once from 8 client threads; submission order is what the
        # service's counter says (submitted_seq), not the order the threads were started in.
        work = [
            (model, trained.train_ids[i * 8 : (i + 1) * 8])
            for i in range(10)
            for model in (mlp, cnn)
        ]
        with ThreadPoolExecutor(max_workers=8) as pool:
            fixed = {"epochs": 3, "calibration": "off"}
            submitted = list(pool.map(lambda mk: stack.submit(mk[0], mk[1], params=fixed), work))
        keys = {job_id: chunk for job_id, (_, chunk) in zip(submitted, work, strict=True)}
        rows = stack.job_rows(submitted)
        jobs: dict[str, list[str]] = {
            model: sorted(
                (j for j, (m, _) in zip(submitted, work, strict=True) if m == model),
                key=lambda j: rows[j].submitted_seq,
            )
            for model in (mlp, cnn)
        }
        # Positions are per model: 1..10 in each model's line.
        for model in (mlp, cnn):
            assert sorted(rows[j].submitted_seq for j in jobs[model]) == list(range(1, 11))
        done = stack.wait(submitted, timeout=240)
    finally:
        worker.stop()
    assert worker.log_text().count("ready") >= 1
    statuses = {j: d["status"] for j, d in done.items()}
    assert set(statuses.values()) == {"succeeded"}, (statuses, worker.log_text()[-3000:])
    for model, job_ids in jobs.items():
        versions = assert_chains(stack, model, job_ids)
        # Each job started from the version its predecessor produced: deletions compound.
        for version, job_id in zip(versions[1:], job_ids, strict=True):
            assert done[job_id]["source_version_id"] == version["parent_id"]
            assert done[job_id]["result_version_id"] == version["id"]
        for job_id in job_ids:
            states = stack.record_states(stack.models[model], keys[job_id])
            assert states == {k: "forgotten" for k in keys[job_id]}
            metrics = done[job_id]["metrics"]
            assert {"before", "after", "influence"} <= set(metrics)
            assert "mia_efficacy" in metrics["after"] and "eval_acc" in metrics["before"]
            timings = done[job_id]["timings"]
            assert {"loading", "influence", "unlearning", "evaluating", "saving"} <= set(timings)
    # Per-model runs never overlapped: every job started after its predecessor finished.
    for job_ids in jobs.values():
        for prev, nxt in zip(job_ids, job_ids[1:], strict=False):
            assert done[nxt]["started_at"] >= done[prev]["finished_at"]
    assert all(count == 1 for count in _versions_by_job(stack).values())
    _no_orphans(stack)
    with stack.sessions() as session:
        assert verify_chain(session)["ok"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "broker_stack", [{"max_attempts": 10, **ONE_JOB_PER_REQUEST}], indirect=True
)
def test_sigkill_during_jobs_loses_nothing_and_duplicates_nothing(
    broker_stack: Stack, trained: Trained, worker_log: Path
) -> None:
    stack = broker_stack
    models = [stack.register(trained, "mlp"), stack.register(trained, "mlp")]
    job_ids = []
    for i in range(6):
        for m, model in enumerate(models):
            chunk = trained.train_ids[(2 * i + m) * 10 : (2 * i + m + 1) * 10]
            job_ids.append(stack.submit(model, chunk, params=LONG_IMU))
    worker = _start_worker(stack, worker_log)
    kills: list[dict[str, object]] = []
    try:
        # Kill modes in turn: the pool child alone (Celery redelivers via
        # reject_on_worker_lost), then the whole worker (machine loss: the reaper recovers).
        killed: set[str] = set()
        for mode in ("child", "group", "group", "child"):
            victim = _wait_running_mid_job(stack, job_ids, timeout=90, avoid=killed)
            if victim is None:
                break
            killed.add(victim)
            attempts_before = stack.job_rows([victim])[victim].attempts
            if mode == "child":
                children = worker.children()
                assert children, worker.log_text()[-2000:]
                for pid in children:
                    _sigkill(pid)
            else:
                worker.kill_group()
            killed_at = time.monotonic()
            if mode == "group":
                worker.start()
            delay = wait_until(
                lambda v=victim, a=attempts_before: _rerunning(stack, v, a),
                timeout=180,
                what=f"job {victim} to run again",
            )
            kills.append(
                {
                    "mode": mode,
                    "job": victim,
                    "redelivery_s": delay,
                    "since_kill_s": time.monotonic() - killed_at,
                }
            )
        done = stack.wait(job_ids, timeout=240)
    finally:
        worker.stop()
    assert len(kills) >= 3, kills
    assert sum(1 for k in kills if k["mode"] == "group") >= 2
    statuses = {j: d["status"] for j, d in done.items()}
    assert set(statuses.values()) == {"succeeded"}, (statuses, worker.log_text()[-4000:])
    for model in models:
        assert_chains(stack, model, [j for j in job_ids if done[j]["model"] == model])
    assert sorted(_versions_by_job(stack)) == sorted(job_ids)  # one version per job, no more
    assert all(count == 1 for count in _versions_by_job(stack).values())
    for kill in kills:
        assert done[str(kill["job"])]["attempts"] >= 2
    _no_orphans(stack)
    print("redelivery after SIGKILL:", kills)


def _sigkill(pid: int) -> None:
    import os

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_running_mid_job(
    stack: Stack, job_ids: list[str], timeout: float, avoid: set[str]
) -> str | None:
    """A job caught in the middle of unlearning (preferably one not killed before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = stack.job_rows(job_ids)
        if all(r.status in ("succeeded", "failed", "cancelled") for r in rows.values()):
            return None
        pending_fresh = any(r.status == "queued" and r.id not in avoid for r in rows.values())
        for row in rows.values():
            mid = row.status == "running" and row.progress < 0.8
            if mid and (row.id not in avoid or not pending_fresh):
                return row.id
        time.sleep(0.05)
    raise AssertionError("no job was caught running mid-way")


def _rerunning(stack: Stack, job_id: str, attempts_before: int) -> bool:
    row = stack.job_rows([job_id])[job_id]
    return row.status == "succeeded" or (row.status == "running" and row.attempts > attempts_before)


def test_cancel_queued_and_running_jobs(
    broker_stack: Stack, trained: Trained, worker_log: Path
) -> None:
    stack = broker_stack
    model = stack.register(trained, "mlp")
    running = stack.submit(model, trained.train_ids[:10], params=LONG_IMU)
    queued = stack.submit(model, trained.train_ids[10:20])
    after = stack.submit(
        model, trained.train_ids[20:30], params={"epochs": 2, "calibration": "off"}
    )
    # The queued one is cancelled before any worker exists: at once, no worker involved.
    resp = stack.cancel(queued)
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    worker = _start_worker(stack, worker_log)
    try:
        wait_until(
            lambda: stack.job_rows([running])[running].phase == "unlearning",
            timeout=60,
            what="the long job to be unlearning",
        )
        asked = time.monotonic()
        assert stack.cancel(running).status_code == 202
        done = stack.wait([running], timeout=60)
        stop_s = time.monotonic() - asked
        done.update(stack.wait([after], timeout=60))
    finally:
        worker.stop()
    assert done[running]["status"] == "cancelled", worker.log_text()[-3000:]
    assert done[running]["result_version_id"] is None
    assert stop_s < 10
    assert stack.job(queued)["status"] == "cancelled"
    assert stack.job(queued)["attempts"] == 0
    assert done[after]["status"] == "succeeded"
    # Only the job that was not cancelled produced a version; cancelled records stay present.
    assert_chains(stack, model, [after])
    assert set(stack.record_states(stack.models[model], trained.train_ids[:20]).values()) == {
        "present"
    }
    for job_id, status in ((running, "cancelled"), (queued, "cancelled")):
        request = stack.client.get(
            f"/v1/deletion-requests/{stack.job(job_id)['request_id']}", headers=stack.headers
        ).json()
        assert request["status"] == status
    events = stack.client.get(
        "/v1/audit", headers=stack.headers, params={"subject_id": running, "limit": 100}
    ).json()["items"]
    assert "job.cancelled" in [e["action"] for e in events]
    _no_orphans(stack)


def test_corrupt_checkpoint_fails_with_a_clear_error_and_no_retry(
    broker_stack: Stack, trained: Trained, worker_log: Path
) -> None:
    stack = broker_stack
    model = stack.register(trained, "mlp")
    v1 = stack.versions(model)[0]
    storage = Path(stack.settings.storage)
    with stack.sessions() as session:
        from service.storage.tables import ModelVersion

        key = session.get(ModelVersion, v1["id"]).storage_key
    path = storage / key
    blob = bytearray(path.read_bytes())
    blob[-16:] = b"\xff" * 16  # flip the last weights: same size, different bytes
    path.write_bytes(bytes(blob))
    job_id = stack.submit(model, trained.train_ids[:5])
    worker = _start_worker(stack, worker_log)
    try:
        done = stack.wait([job_id], timeout=60)[job_id]
        # The compose file's worker healthcheck: the node answers a remote-control ping.
        ping = subprocess.run(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app:app",
                "inspect",
                "ping",
                "-d",
                f"lethe@{socket.gethostname()}",
                "--timeout",
                "10",
            ],
            env=settings_env(stack.settings),
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        worker.stop()
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    assert done["status"] == "failed"
    assert done["attempts"] == 1  # deterministic: not retried
    error = done["error"]
    assert error["type"].endswith("/checkpoint-corrupt")
    assert error["title"] == "Checkpoint corrupt"
    assert "sha256" in error["detail"] and "version 1" in error["detail"]
    assert [v["number"] for v in stack.versions(model)] == [1]
    assert stack.versions(model)[0]["status"] == "active"
    assert set(stack.record_states(stack.models[model], trained.train_ids[:5]).values()) == {
        "present"
    }
    _no_orphans(stack)
