"""Prometheus metric families shared by the API (service.api.observability) and the worker
(worker.metrics_server): one definition per concept, whichever process exposes it.

- `lethe_jobs{status}`: jobs by status, counted in the database at scrape time, so every
  replica and every worker reports the same truth;
- `lethe_queue_depth{queue}`: jobs waiting to run: messages in the broker's queue (Celery),
  or jobs queued in the database (`queue="database"`, the embedded executor's queue);
- `lethe_job_phase_duration_seconds{phase}`: seconds one attempt of a job spent in each phase
  (loading, influence, unlearning, retraining, evaluating, saving).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.domain.states import JOB_STATES, JobStatus

log = logging.getLogger("lethe.metrics")

JOBS = ("lethe_jobs", "Jobs by status.")
QUEUE_DEPTH = ("lethe_queue_depth", "Jobs waiting to run (broker messages, or queued jobs).")
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def job_counts(sessions: Callable[[], Any]) -> dict[str, int]:
    from service.storage.tables import Job

    with sessions() as session:
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {str(status): int(count) for status, count in rows}


class JobCollector(Collector):
    """`lethe_jobs{status}` from the database; a scrape never fails because it is down."""

    def __init__(self, sessions: Callable[[], Any]) -> None:
        self._sessions = sessions

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Declared so registering does not run a database query.
        yield GaugeMetricFamily(*JOBS, labels=["status"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(*JOBS, labels=["status"])
        try:
            counts = job_counts(self._sessions)
        except Exception:
            log.warning("could not count jobs for /metrics", exc_info=True)
            return
        for status in JOB_STATES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge


class QueueDepthCollector(Collector):
    """`lethe_queue_depth{queue}` from `read()` at scrape time (None: unknown, not exposed)."""

    def __init__(self, queue: str, read: Callable[[], int | None]) -> None:
        self._queue, self._read = queue, read

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(*QUEUE_DEPTH, labels=["queue"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            depth = self._read()
        except Exception:
            log.warning("could not read the queue depth for /metrics", exc_info=True)
            return
        if depth is None:
            return
        gauge = GaugeMetricFamily(*QUEUE_DEPTH, labels=["queue"])
        gauge.add_metric([self._queue], depth)
        yield gauge


def queued_in_database(sessions: Callable[[], Any]) -> Callable[[], int]:
    """The embedded executor's queue depth: jobs queued in the database."""
    return lambda: job_counts(sessions).get(JobStatus.QUEUED, 0)


def phase_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "lethe_job_phase_duration_seconds",
        "Seconds one attempt of a job spent in each phase.",
        ["phase"],
        registry=registry,
        buckets=PHASE_BUCKETS,
    )
