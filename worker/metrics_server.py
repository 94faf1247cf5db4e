"""The worker's Prometheus endpoint (LETHE_WORKER_METRICS_PORT; 0, the default, is off).

It runs in the process that runs jobs, where the phase timings are observed: the embedded
executor, a solo Celery worker, or each prefork pool child, child N on the port + N (Celery's
pool index, so a restarted child takes its predecessor's port). The families are
service.telemetry's, the API's too: jobs by status and the queue depth, read at scrape time,
and the phase-duration histogram, observed at the end of every attempt (worker.execution).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from service.settings import Settings
from service.telemetry import JobCollector, QueueDepthCollector, phase_histogram

log = logging.getLogger("lethe.worker")

REGISTRY = CollectorRegistry(auto_describe=True)
PHASE_SECONDS = phase_histogram(REGISTRY)


def observe_phases(timings: Mapping[str, float]) -> None:
    """One attempt's seconds per phase (`total` is their sum, not a phase)."""
    for phase, seconds in timings.items():
        if phase != "total" and seconds >= 0:
            PHASE_SECONDS.labels(phase).observe(seconds)


@dataclass
class MetricsEndpoint:
    port: int
    server: Any
    collectors: list[Collector] = field(default_factory=list)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for collector in self.collectors:
            REGISTRY.unregister(collector)


def start_metrics_server(
    settings: Settings,
    sessions: Callable[[], Any],
    queue: tuple[str, Callable[[], int | None]],
    port_offset: int = 0,
) -> MetricsEndpoint | None:
    """Serve REGISTRY plus the scrape-time families; None when the setting is 0.

    ``queue``: the label and the reader of `lethe_queue_depth` for this kind of worker."""
    if not settings.worker_metrics_port:
        return None
    port = settings.worker_metrics_port + port_offset
    collectors: list[Collector] = [JobCollector(sessions), QueueDepthCollector(*queue)]
    for collector in collectors:
        REGISTRY.register(collector)
    try:
        server, _thread = start_http_server(port, settings.worker_metrics_addr, REGISTRY)
    except OSError:
        for collector in collectors:
            REGISTRY.unregister(collector)
        raise
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_addr, port)
    return MetricsEndpoint(port, server, collectors)
