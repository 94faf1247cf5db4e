"""Hands a committed job's id to whatever executes jobs.

Embedded mode (no LETHE_BROKER_URL): nothing to send; the executor process polls the database
for queued jobs. Broker mode: a Celery message named `lethe.run_job` whose task id is the job
id. The service sends by task name, so it never imports the worker's Celery app.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

from service.settings import Settings

RUN_JOB_TASK = "lethe.run_job"


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...


class EmbeddedQueue:
    def enqueue(self, job_id: str) -> None:  # the embedded executor polls the database
        return None


class CeleryQueue:
    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self._queue = settings.queue_name
        self._app = Celery("lethe-client", broker=settings.broker_url, set_as_current=False)
        self._app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
            broker_transport_options={"visibility_timeout": settings.job_hard_time_limit_s * 2},
        )

    def enqueue(self, job_id: str) -> None:
        self._app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=self._queue)


@lru_cache(maxsize=8)
def get_queue(settings: Settings) -> JobQueue:
    return EmbeddedQueue() if settings.embedded else CeleryQueue(settings)
