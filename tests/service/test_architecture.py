"""One definition per concept: UTC timestamps, backoff, Celery configuration, module sizes,
and the service never importing the worker's Celery/runner code."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.backoff import backoff_delay
from service.models import ApiKey, Base
from service.queue import CeleryQueue, celery_config
from service.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_timestamps_read_back_aware_utc_on_sqlite(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'utc.db'}")
    Base.metadata.create_all(engine)
    local = datetime(2026, 1, 2, 5, 0, tzinfo=timezone(timedelta(hours=2)))
    with Session(engine) as session:
        session.add(ApiKey(name="k", key_hash="h" * 64, scope="read", created_at=local))
        session.commit()
    with Session(engine) as session:
        created = session.execute(select(ApiKey.created_at)).scalar_one()
        # Compared as a bound parameter too: the zone is normalised on the way in.
        found = session.execute(
            select(ApiKey.id).where(ApiKey.created_at == datetime(2026, 1, 2, 3, 0, tzinfo=UTC))
        ).scalar_one_or_none()
    assert created == datetime(2026, 1, 2, 3, 0, tzinfo=UTC) and created.tzinfo is UTC
    assert found is not None
    engine.dispose()


def test_one_backoff() -> None:
    assert [backoff_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(3, base=0.5, cap=30.0) == 4.0
    assert backoff_delay(10, base=15.0, cap=600.0) == 600.0


def test_api_sender_and_worker_share_the_celery_configuration(lethe_env: Path) -> None:
    from worker.celery_app import create_celery

    settings = load_settings(
        broker_url="redis://127.0.0.1:6379/9", job_soft_time_limit_s=100,
        job_hard_time_limit_s=130,
    )  # fmt: skip
    conf = celery_config(settings)
    assert conf["broker_transport_options"]["visibility_timeout"] == 130 * 2 + 60
    sender = CeleryQueue(settings)._app.conf
    worker = create_celery(settings).conf
    for key in ("broker_transport_options", "task_serializer", "accept_content"):
        assert sender[key] == worker[key] == conf[key]


def test_modules_are_small_and_the_service_does_not_import_the_worker_runner() -> None:
    sources = [p for folder in ("service", "worker") for p in (ROOT / folder).rglob("*.py")
               if "migrations" not in p.parts]  # fmt: skip
    too_long = {str(p.relative_to(ROOT)): n for p in sources
                if (n := len(p.read_text().splitlines())) > 500}  # fmt: skip
    assert not {k: v for k, v in too_long.items() if k.startswith("worker/")}, too_long
    forbidden = ("worker.runner", "worker.celery_app", "worker.tasks", "worker.execution",
                 "worker.job_queue", "worker.saving", "worker.loading")  # fmt: skip
    for path in (ROOT / "service").rglob("*.py"):
        if "cli" in path.parts:  # `lethe worker` starts the worker: the one allowed place
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(forbidden), (path, node.module)
