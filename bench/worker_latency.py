"""Worker latencies: POST→running with an idle worker, and redelivery delay after a SIGKILL.

    python -m bench.worker_latency [--samples 10] [--kills 3] [--out FILE.json]

Default output: bench/results/worker_latency.json. Needs the local PostgreSQL
(LETHE_TEST_PG_ADMIN, default postgresql+psycopg://postgres@127.0.0.1/test) and a `redis-server`
binary: it creates its own PostgreSQL database and starts its own
redis-server on a free port, and removes both at the end. Production timing settings are used
(lease 30 s, heartbeat 5 s, reaper every 5 s); only the data and models are small.

Measured:
- trivial_requests (issue 27): the first request after the worker started, then warm ones:
  POST to the job's `finished_at` against the sum of its phase timings, with the goals
  "a warm trivial request within 3x the sum of its phases" and "the first job within 2x a
  warm one" (both per mode, `goals`);
- post_to_running: wall time from sending POST /v1/deletion-requests to the job's `started_at`
  (stamped by the worker at claim), with the worker otherwise idle — Celery+Redis, and the
  embedded executor (SQLite, LETHE_EMBEDDED_POLL_SECONDS default 0.5 s);
- redelivery_after_sigkill: from SIGKILL to the job running again under a new attempt —
  (a) the pool child only (Celery requeues the message: reject_on_worker_lost), (b) the whole
  worker, restarted at once (the restarted worker's reaper sees the holder's pid is gone).
  A worker on another host is recovered when its lease expires: ≤ lease + reaper interval.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.worker.harness import (  # noqa: E402
    Stack,
    WorkerProcess,
    api_stack,
    stack_settings,
    train_models,
    wait_until,
)
from tests.worker.redis_server import ThrowawayRedis  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "LETHE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PRODUCTION_TIMING = {
    "lease_seconds": 30.0,
    "heartbeat_seconds": 5.0,
    "reaper_interval_seconds": 5.0,
    "embedded_poll_seconds": 0.5,
}
LONG = {
    "calibration": "off",
    "epochs": 600,
    "top_data": 1.0,
    "batch_size": 1,
    "backbone_mode": "train",
    "lr": 1e-5,
}


def _summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median_s": round(statistics.median(ordered), 4),
        "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        "min_s": round(ordered[0], 4),
        "max_s": round(ordered[-1], 4),
        "samples_s": [round(v, 4) for v in values],
    }


def _when(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _started_at(stack: Stack, job_id: str) -> datetime | None:
    row = stack.job_rows([job_id])[job_id]
    if row.started_at is None:
        return None
    return _when(row.started_at)


def post_to_running(stack: Stack, model: str, keys: list[str], samples: int) -> list[float]:
    out = []
    for i in range(samples):
        # Idle worker, nothing in flight; the jitter keeps submissions from phase-locking with
        # the embedded executor's polling.
        time.sleep(1.0 + random.uniform(0.0, 1.0))
        chunk = keys[i * 4 : (i + 1) * 4]
        sent = datetime.now(UTC)
        job_id = stack.submit(model, chunk, params=TRIVIAL)
        wait_until(lambda j=job_id: _started_at(stack, j) is not None, timeout=60)
        started = _started_at(stack, job_id)
        assert started is not None
        out.append((started - sent).total_seconds())
        stack.wait([job_id], timeout=60)
    return out


TRIVIAL = {"epochs": 1, "calibration": "off"}


def trivial_requests(stack: Stack, model: str, keys: list[str], samples: int) -> dict[str, Any]:
    """Call right after the worker is ready: sample 0 is the first job it runs."""
    walls, phases = [], []
    for i in range(samples + 1):
        time.sleep(0.3)
        sent = datetime.now(UTC)
        job_id = stack.submit(model, keys[i * 3 : (i + 1) * 3], params=TRIVIAL)
        job = stack.wait([job_id], timeout=120)[job_id]
        row = stack.job_rows([job_id])[job_id]
        assert row.finished_at is not None, job
        walls.append((_when(row.finished_at) - sent).total_seconds())
        timings = job.get("timings") or {}
        phases.append(sum(float(v) for k, v in timings.items() if k != "total"))
    warm_wall = statistics.median(walls[1:])
    warm_phases = statistics.median(phases[1:])
    return {
        "params": TRIVIAL,
        "first_wall_s": round(walls[0], 4),
        "first_phases_s": round(phases[0], 4),
        "warm_wall": _summary(walls[1:]),
        "warm_phases": _summary(phases[1:]),
        "goals": {
            "warm_within_3x_phases": {
                "ratio": round(warm_wall / warm_phases, 2),
                "met": warm_wall <= 3 * warm_phases,
            },
            "first_within_2x_warm": {
                "ratio": round(walls[0] / warm_wall, 2),
                "met": walls[0] <= 2 * warm_wall,
            },
        },
    }


def redelivery(
    stack: Stack, worker: WorkerProcess, model: str, keys: list[str], mode: str
) -> float:
    job_id = stack.submit(model, keys, params=LONG)
    wait_until(lambda: stack.job_rows([job_id])[job_id].status == "running", timeout=120)
    time.sleep(0.3)  # past loading: in the middle of the job
    attempts = stack.job_rows([job_id])[job_id].attempts
    killed = time.monotonic()
    if mode == "pool_child":
        for pid in worker.children():
            os.kill(pid, signal.SIGKILL)
    else:
        worker.kill_group()
        worker.start()

    def rerunning() -> bool:
        row = stack.job_rows([job_id])[job_id]
        return row.status == "running" and row.attempts > attempts

    wait_until(rerunning, timeout=120, interval=0.02)
    delay = time.monotonic() - killed
    stack.wait([job_id], timeout=180)
    return delay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--kills", type=int, default=3, help="kills per mode")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "worker_latency.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for var in [v for v in os.environ if v.startswith("LETHE_") and not v.startswith("LETHE_TEST")]:
        del os.environ[var]

    trained = train_models()
    keys = trained.train_ids
    work = Path(tempfile.mkdtemp(prefix="lethe-bench-"))
    db_name = f"lethe_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    redis_server = ThrowawayRedis(work)
    redis_server.start()
    results: dict[str, Any] = {
        "benchmark": "worker_latency",
        "created_at": datetime.now(UTC).isoformat(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "device": "cpu",
        "settings": PRODUCTION_TIMING,
        "model": "mlp (64-32-10) on sklearn digits",
    }
    try:
        # Celery + Redis + PostgreSQL.
        (work / "storage").mkdir()
        settings = stack_settings(
            database_url=PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + db_name,
            storage_dir=work / "storage",
            broker_url=redis_server.url,
            **PRODUCTION_TIMING,
        )
        with api_stack(settings) as stack:
            model = stack.register(trained, "mlp")
            worker = WorkerProcess.celery(settings, work / "worker.log").start()
            try:
                wait_until(lambda: "ready" in worker.log_text(), timeout=120)
                trivial = trivial_requests(stack, model, keys[600:], args.samples)
                results["trivial_requests_celery"] = trivial
                latencies = post_to_running(stack, model, keys[:400], args.samples)
                results["post_to_running_celery"] = _summary(latencies)
                kills: dict[str, list[float]] = {"pool_child": [], "whole_worker_restarted": []}
                offset = 400
                for _ in range(args.kills):
                    for mode in kills:
                        kills[mode].append(
                            redelivery(stack, worker, model, keys[offset : offset + 10], mode)
                        )
                        offset += 10
                results["redelivery_after_sigkill"] = {m: _summary(v) for m, v in kills.items()}
                bound = PRODUCTION_TIMING["lease_seconds"]
                results["redelivery_other_host_bound_s"] = (
                    bound + PRODUCTION_TIMING["reaper_interval_seconds"]
                )
            finally:
                worker.stop()
        # Embedded executor + SQLite.
        (work / "storage-embedded").mkdir()
        settings = stack_settings(
            database_url=f"sqlite:///{work / 'embedded.db'}",
            storage_dir=work / "storage-embedded",
            **PRODUCTION_TIMING,
        )
        with api_stack(settings) as stack:
            model = stack.register(trained, "mlp")
            executor = WorkerProcess.embedded(settings, work / "executor.log").start()
            try:
                wait_until(lambda: "executor started" in executor.log_text(), timeout=120)
                trivial = trivial_requests(stack, model, keys[600:], args.samples)
                results["trivial_requests_embedded"] = trivial
                latencies = post_to_running(stack, model, keys[:400], args.samples)
                results["post_to_running_embedded"] = _summary(latencies)
            finally:
                executor.stop()
    finally:
        redis_server.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
