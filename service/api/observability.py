"""Prometheus metrics: request counts and latency by route template, jobs by status.

Each app instance owns its registry, so several apps in one process (tests) never clash.
Job counts are read from the database at scrape time: they are true for every replica.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.domain.states import JOB_STATES

log = logging.getLogger("lethe.metrics")


class _JobCollector(Collector):
    def __init__(self, state: Any) -> None:
        self._state = state

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Declared so registering does not run a database query at app creation.
        yield GaugeMetricFamily("lethe_jobs", "Jobs by status.", labels=["status"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from service.storage.models import Job

        gauge = GaugeMetricFamily("lethe_jobs", "Jobs by status.", labels=["status"])
        try:
            with self._state.sessions() as session:
                counts = dict(
                    session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                )
        except Exception:  # a scrape must not fail because the database is down
            log.warning("could not count jobs for /metrics", exc_info=True)
            return
        for status in JOB_STATES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lethe_http_requests",
            "HTTP requests by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lethe_http_request_duration_seconds",
            "HTTP request latency by method and route.",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

    def watch_jobs(self, state: Any) -> None:
        self.registry.register(_JobCollector(state))


class MetricsMiddleware:
    """Pure ASGI (no body buffering, works with streaming downloads)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The template (/v1/jobs/{job_id}), never the raw path: bounded label values.
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)


def render(state: Any) -> tuple[bytes, str]:
    return generate_latest(state.metrics.registry), CONTENT_TYPE_LATEST
