"""One-time costs paid at start-up, not by the first job (issue 27): the API opens its broker
connection beside its start, and a Celery pool child makes its job context and a database
connection before it takes a job. Neither start waits for, or fails on, a service that is
down: the first submission or job connects on its own."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.domain.queue import CeleryQueue
from service.settings import Settings
from tests.service.netfaults import free_port
from tests.worker.harness import api_stack, stack_settings, wait_until
from tests.worker.redis_server import ThrowawayRedis
from worker import celery_app, tasks

pytestmark = [pytest.mark.postgres]


def _clients(server: ThrowawayRedis) -> int:
    """Connections the server has, not counting the one asking."""
    with redis.Redis.from_url(server.url) as client:
        return len(client.client_list()) - 1


def _settings(postgres_url: str, storage_dir: Path, broker_url: str) -> Settings:
    return stack_settings(database_url=postgres_url, storage_dir=storage_dir, broker_url=broker_url)


def test_queue_connects_before_the_first_send(
    lethe_env: Path, postgres_url: str, storage_dir: Path, private_redis: ThrowawayRedis
) -> None:
    queue = CeleryQueue(_settings(postgres_url, storage_dir, private_redis.url))
    assert _clients(private_redis) == 0
    queue.connect()
    assert _clients(private_redis) >= 1  # pooled: the first send reuses it
    queue.enqueue("job-after-connect")
    with redis.Redis.from_url(private_redis.url) as client:
        assert client.llen(queue._settings.queue_name) == 1


def test_queue_connect_fails_at_once_without_a_broker(
    lethe_env: Path, postgres_url: str, storage_dir: Path
) -> None:
    queue = CeleryQueue(_settings(postgres_url, storage_dir, f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(Exception, match="(?i)refused|connect"):
        queue.connect()  # no retry loop: the caller logs and goes on


def test_api_start_opens_the_broker_connection(
    lethe_env: Path, postgres_url: str, storage_dir: Path, private_redis: ThrowawayRedis
) -> None:
    with api_stack(_settings(postgres_url, storage_dir, private_redis.url)) as stack:
        wait_until(lambda: _clients(private_redis) >= 1, timeout=10, what="a broker connection")
        assert stack.client.get("/healthz").status_code == 200


def test_api_serves_while_the_broker_is_down(
    lethe_env: Path, postgres_url: str, storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING), api_stack(_settings(postgres_url, storage_dir, down)):
        wait_until(lambda: "broker not reachable yet" in caplog.text, timeout=10, what="warning")


@contextlib.contextmanager
def _worker_settings(settings: Settings) -> Iterator[None]:
    """The worker app's settings for one test (Celery's conf is not monkeypatch-friendly)."""
    old = celery_app.app.conf.lethe_settings
    celery_app.app.conf.lethe_settings = settings
    try:
        yield
    finally:
        celery_app.app.conf.lethe_settings = old


def test_pool_child_context_is_ready_before_its_first_job(
    lethe_env: Path, postgres_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "_contexts", {})
    with _worker_settings(_settings(postgres_url, storage_dir, "")):
        celery_app._open_context()
    ctx = tasks._contexts[os.getpid()]
    engine = ctx.session_factory.kw["bind"]
    try:
        assert engine.pool.checkedin() == 1  # the first claim takes this one, no connect
        assert ctx._device == "cpu"
    finally:
        engine.dispose()


def test_pool_child_starts_while_the_database_is_down(
    lethe_env: Path,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere"
    monkeypatch.setattr(tasks, "_contexts", {})
    with caplog.at_level(logging.WARNING), _worker_settings(_settings(down, storage_dir, "")):
        celery_app._open_context()  # logs, does not raise: the child must still start
    assert "database not reachable yet" in caplog.text
