"""Migrations: round trip, models match the migrations, and a database behind head is refused."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from service.storage import migrate
from service.storage.db import make_engine, make_session_factory
from service.storage.models import AuditHead, Base, Counter

TABLES = {
    "api_keys",
    "datasets",
    "records",
    "models",
    "model_versions",
    "deletion_requests",
    "jobs",
    "audit_head",
    "audit_events",
    "counters",
}


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_round_trip_and_no_autogenerate_diff_postgres(postgres_url: str) -> None:
    migrate.upgrade(postgres_url)
    assert _tables(postgres_url) == TABLES
    migrate.downgrade(postgres_url, "base")
    assert _tables(postgres_url) == set()
    migrate.upgrade(postgres_url)
    assert _tables(postgres_url) == TABLES
    assert _diff(postgres_url) == []
    engine = make_engine(postgres_url)
    migrate.check_at_head(engine)
    with make_session_factory(engine)() as s:
        head = s.get(AuditHead, 1)
        assert head is not None and head.seq == 0 and head.hash == "0" * 64
        assert s.execute(select(Counter.value).where(Counter.name == "job_seq")).scalar() == 0
    engine.dispose()


def test_round_trip_and_no_diff_sqlite(sqlite_url: str) -> None:
    migrate.upgrade(sqlite_url)
    migrate.downgrade(sqlite_url, "base")
    assert _tables(sqlite_url) == set()
    migrate.upgrade(sqlite_url)
    assert _tables(sqlite_url) == TABLES and _diff(sqlite_url) == []


def test_app_refuses_database_behind_head(database_url: str, lethe_env, storage_dir) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import load_settings

    settings = load_settings(database_url=database_url, storage_url=str(storage_dir))
    app = create_app(settings)
    client = TestClient(app, raise_server_exceptions=False)
    ready = client.get("/readyz")  # no lifespan here: the route itself reports the state
    assert ready.status_code == 503 and "lethe migrate" in ready.json()["detail"]
    assert ready.json()["checks"]["database"] == "migration-pending"
    with pytest.raises(migrate.SchemaBehind, match="lethe migrate"), client:
        pass
    migrate.upgrade(database_url)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
