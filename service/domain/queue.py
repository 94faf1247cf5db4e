"""Hands a committed job's id to whatever executes jobs.

Embedded mode (no LETHE_BROKER_URL): a datagram to the executor's wake-up socket (an abstract
Unix socket named after the installation's database, see `wake_address`), so a job starts
at once instead of at the executor's next poll; the poll stays as the fallback for a lost
datagram or an executor on another host. Broker mode: a Celery message named `lethe.run_job`
whose task id is the job id. The service sends by task name, so it never imports the worker's
Celery app; the worker's app (worker.celery_app) takes its configuration and its `enqueue`
from here, so the two cannot disagree.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

from service.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("lethe.queue")
RUN_JOB_TASK = "lethe.run_job"


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...

    def connect(self) -> None:
        """Pay the first send's set-up now (at start-up), not in the first submission."""


def wake_address(settings: Settings) -> bytes:
    """The executor's wake-up socket: Linux's abstract namespace (no file, no path limit),
    one name per installation (database), shared by the API and the executor it serves."""
    digest = hashlib.sha256(settings.db_url.encode()).hexdigest()[:24]
    return b"\0lethe-wake-" + digest.encode()


class EmbeddedQueue:
    def __init__(self, settings: Settings) -> None:
        self._address = wake_address(settings)
        self._socket: socket.socket | None = None
        if hasattr(socket, "AF_UNIX"):
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)

    def enqueue(self, job_id: str) -> None:
        if self._socket is None:
            return
        # No executor listening (or its buffer is full): it polls.
        with contextlib.suppress(OSError):
            self._socket.sendto(job_id.encode(), self._address)

    def connect(self) -> None:
        """Nothing to open: a datagram needs no connection."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """The one Celery configuration, for the worker's app and the API's sender alike."""
    # Longer than the hard limit, so a long job's message is not redelivered while it runs.
    visibility = settings.job_hard_time_limit_s * 2 + 60
    transport = {"visibility_timeout": visibility}
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": settings.job_hard_time_limit_s,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "result_expires": 24 * 3600,
        "task_default_queue": settings.queue_name,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.queue_name}},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # ride out a broker restart, however long
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "task_track_started": False,
        "enable_utc": True,
    }


def send_run_job(
    app: Celery, settings: Settings, job_id: str, countdown: float | None = None
) -> None:
    """The run message of a job: task id = job id, on the configured queue."""
    app.send_task(
        RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=settings.queue_name, countdown=countdown
    )


class CeleryQueue:
    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self._settings = settings
        self._app = Celery("lethe-client", broker=settings.broker_url, set_as_current=False)
        self._app.conf.update(celery_config(settings))

    def enqueue(self, job_id: str) -> None:
        send_run_job(self._app, self._settings, job_id)

    def connect(self) -> None:
        """Open a pooled broker connection, declare the queue on it and build the result
        backend: the first submission after a start paid ~80 ms for these (bench/
        worker_latency.py). Raises if the broker cannot be reached (no retry)."""
        with self._app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=0)
            producer.maybe_declare(self._app.amqp.queues[self._settings.queue_name])
        self._app.backend  # noqa: B018  (created on first use)


@lru_cache(maxsize=8)
def get_queue(settings: Settings) -> JobQueue:
    return EmbeddedQueue(settings) if settings.embedded else CeleryQueue(settings)


def enqueue_job(settings: Settings, job_id: str) -> None:
    """Send a committed job its run message. A failure is logged, not raised: the job row is
    committed and stays queued, and the worker's re-dispatch picks it up."""
    try:
        get_queue(settings).enqueue(job_id)
    except Exception:
        log.exception("could not hand job %s to the queue; it stays queued", job_id)
