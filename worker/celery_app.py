"""The Celery application: `celery -A worker.celery_app worker` (or `lethe worker`).

Delivery is at-least-once and the database decides what runs (see worker.job_queue).
The configuration is service.domain.queue.celery_config, shared with the API's sender:
- JSON only; the task id is the job id; one queue, `LETHE_QUEUE_NAME`.
- `acks_late` + `reject_on_worker_lost`: a message is acknowledged only once its job has been
  handled, and goes back to the queue if the pool process dies under it.
- prefetch multiplier 1: a busy worker does not hoard messages another worker could run.
- soft/hard time limits from settings; the broker's visibility timeout is longer than the hard
  limit so a long job's message is not redelivered while it still runs.
- results: kept in `LETHE_RESULT_BACKEND_URL` (default: the broker) for a day; job state lives
  in the database, the result is only a debugging aid.

The main (parent) process never touches CUDA: it only imports torch so that forked pool
children start fast; the device is resolved in the child that runs the job (worker.device).
It runs the reaper thread (worker.reaper) unless LETHE_WORKER_REAPER=0.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from service.domain.queue import celery_config, send_run_job
from service.settings import Settings, get_settings

log = logging.getLogger("lethe.worker")


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    broker = settings.broker_url or "memory://"
    backend = settings.result_backend_url or settings.broker_url or None
    app = Celery("lethe", broker=broker, backend=backend, include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    app.conf.lethe_settings = settings
    return app


app = create_celery()


def enqueue(job_id: str, countdown: float | None = None) -> None:
    """Send the run message for a job (the one shape: service.domain.queue.send_run_job)."""
    send_run_job(app, app.conf.lethe_settings, job_id, countdown)


# --------------------------------------------------------------------------- worker hooks

_reaper_state: dict[str, Any] = {}


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    # Celery configures its own handlers; Lethe's format (LETHE_LOG_FORMAT) and the job and
    # request ids (service.logs) go onto them, so the worker's lines look like the API's.
    from service.logs import use_format

    for handler in logger.handlers:
        use_format(handler, app.conf.lethe_settings.log_format)


@signals.worker_init.connect
def _preload_engine(**_: Any) -> None:
    # Imported (not initialised) in the parent so forked children skip the import cost.
    import torch  # noqa: F401

    import worker.imu  # noqa: F401


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    if os.environ.get("LETHE_WORKER_REAPER", "1") == "0":
        return
    from service.storage.db import make_engine, make_session_factory
    from service.storage.objects import Storage
    from worker.lease import worker_identity
    from worker.reaper import Reaper, ReaperThread

    settings: Settings = app.conf.lethe_settings
    engine = make_engine(settings.db_url)
    reaper = Reaper(
        settings,
        make_session_factory(engine),
        Storage.from_settings(settings),
        actor=f"worker:{worker_identity()}",
        enqueue=enqueue,
    )
    thread = ReaperThread(reaper, settings.reaper_interval_seconds)
    _reaper_state.update(engine=engine, thread=thread)
    thread.start()
    log.info("reaper started (every %.1f s)", settings.reaper_interval_seconds)


@signals.worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    thread = _reaper_state.pop("thread", None)
    if thread is not None:
        thread.stop()


@signals.worker_init.connect
def _import_before_fork(**_: Any) -> None:
    # The main process imports the engine before it forks its pool and says "ready": the
    # children inherit the modules, so a job sent right after "ready" does not wait for a
    # child's imports (measured 2.8 s, bench/worker_latency.py). No torch op runs here.
    from worker.warmup import import_engine

    log.info("engine imported in %.2f s", import_engine())


@signals.worker_process_init.connect
def _child_init(**_: Any) -> None:
    # A pool child inherits the parent's reaper engine: drop its pooled connections without
    # closing them, so the child never talks over (or closes) the parent's sockets.
    engine = _reaper_state.get("engine")
    if engine is not None:
        engine.dispose(close=False)
    _reaper_state.clear()
    threads = os.environ.get("LETHE_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from worker.warmup import warm_up

    warm_up()  # in the child, after the fork: the parent runs no torch op
    _open_context()
    _start_metrics()


def _open_context() -> None:
    """The child's job context and one pooled database connection, made before the first
    job: its first claim paid ~90 ms for them (bench/worker_latency.py)."""
    from sqlalchemy import text

    from worker.tasks import runner_context

    try:
        ctx = runner_context()
        ctx.device  # noqa: B018  (resolved once, on first use)
        with ctx.session_factory() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # the first job connects (and retries) on its own
        log.warning("pool child: database not reachable yet (%s)", str(exc).splitlines()[0][:200])


def _broker_depth() -> int:
    """Messages waiting in LETHE_QUEUE_NAME (kombu sums a Redis queue's priority lists).
    Not passive: on Redis an empty queue has no key, and a passive declare calls it missing;
    declaring the queue this worker consumes anyway changes nothing."""
    with app.connection_for_read() as conn:
        declared = conn.default_channel.queue_declare(queue=app.conf.lethe_settings.queue_name)
        return int(declared.message_count)


def _start_metrics() -> None:
    """LETHE_WORKER_METRICS_PORT in the process that runs jobs: a prefork child serves on
    the port + its pool index; the solo pool (index 0) in the main process."""
    settings: Settings = app.conf.lethe_settings
    if not settings.worker_metrics_port:
        return
    from billiard.process import current_process

    from service.storage.db import make_engine, make_session_factory
    from worker.metrics_server import start_metrics_server

    offset = int(getattr(current_process(), "index", 0) or 0)
    sessions = make_session_factory(make_engine(settings.db_url))
    try:
        start_metrics_server(settings, sessions, (settings.queue_name, _broker_depth), offset)
    except OSError as exc:  # a port in use must not stop the worker from running jobs
        log.error(
            "worker metrics: cannot listen on port %d: %s",
            settings.worker_metrics_port + offset,
            exc,
        )
