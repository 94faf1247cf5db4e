"""Migrations: round trip, models match the migrations, and a database behind head is refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from service.storage import migrate
from service.storage.db import make_engine, make_session_factory
from service.storage.tables import AuditHead, Base, Counter

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


ROOT = Path(__file__).resolve().parents[2]


def test_migrations_are_the_installed_top_level_package() -> None:
    """The scripts live in the top-level `migrations/` folder, a package that pyproject's package
    discovery installs, so `lethe migrate` finds them without the source tree."""
    import migrations

    assert Path(migrate.SCRIPT_LOCATION) == Path(migrations.__file__).parent == ROOT / "migrations"
    assert (ROOT / "migrations" / "env.py").is_file()
    assert not (ROOT / "service" / "storage" / "migrations").exists()
    versions = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("0*.py"))
    assert versions[0].startswith("0001_") and migrate.head_revision() == versions[-1][:4]
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "migrations*" in setuptools["packages"]["find"]["include"]
    assert "script.py.mako" in setuptools["package-data"]["migrations"]


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


def _row(table, **values):
    """Values for every NOT NULL column of a reflected table (dummies of the column's type)."""
    import datetime as dt

    from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, Numeric

    row = {}
    for col in table.columns:
        if col.nullable or col.server_default is not None or col.name in values:
            continue
        if col.primary_key and isinstance(col.type, Integer):
            continue
        kind = col.type
        row[col.name] = (
            dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
            if isinstance(kind, DateTime)
            else False
            if isinstance(kind, Boolean)
            else 0
            if isinstance(kind, Integer | Float | Numeric)
            else {}
            if isinstance(kind, JSON)
            else "x"
        )
    return {**row, **values}


def test_held_by_is_filled_from_the_requests_that_hold_records(database_url: str) -> None:
    """0002 → 0003: records named by queued/running/needs_review requests are held by them;
    records of a failed request are not."""
    from sqlalchemy import MetaData, Table, insert

    migrate.upgrade(database_url, "0002")
    engine = make_engine(database_url)
    meta = MetaData()
    t = {
        n: Table(n, meta, autoload_with=engine)
        for n in ("datasets", "records", "models", "deletion_requests")
    }
    with engine.begin() as conn:
        conn.execute(insert(t["datasets"]).values(_row(t["datasets"], id="d1")))
        conn.execute(insert(t["models"]).values(_row(t["models"], id="m1", name="m")))
        for i, key in enumerate("abcd"):
            conn.execute(
                insert(t["records"]).values(
                    _row(t["records"], dataset_id="d1", key=key, row=i, state="present")
                )
            )
        for rid, keys, status in (
            ("q", ["a", "b"], "queued"),
            ("f", ["c"], "failed"),
            ("r", ["d"], "needs_review"),
        ):
            conn.execute(
                insert(t["deletion_requests"]).values(
                    _row(
                        t["deletion_requests"],
                        id=rid,
                        model_id="m1",
                        dataset_id="d1",
                        record_keys=keys,
                        status=status,
                    )
                )
            )
    engine.dispose()
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    with engine.connect() as conn:
        held = dict(conn.execute(text("SELECT key, held_by_request_id FROM records")).all())
    engine.dispose()
    assert held == {"a": "q", "b": "q", "c": None, "d": "r"}


def test_job_kind_becomes_method_and_back(database_url: str) -> None:
    """0007 → 0008: jobs.kind is renamed jobs.method with its values; the downgrade renames back."""
    from sqlalchemy import MetaData, Table, insert

    migrate.upgrade(database_url, "0007")
    engine = make_engine(database_url)
    meta = MetaData()
    t = {
        n: Table(n, meta, autoload_with=engine)
        for n in ("datasets", "models", "deletion_requests", "jobs")
    }
    with engine.begin() as conn:
        conn.execute(insert(t["datasets"]).values(_row(t["datasets"], id="d1")))
        conn.execute(insert(t["models"]).values(_row(t["models"], id="m1", name="m")))
        conn.execute(
            insert(t["deletion_requests"]).values(
                _row(
                    t["deletion_requests"],
                    id="r1",
                    model_id="m1",
                    dataset_id="d1",
                    status="queued",
                )
            )
        )
        conn.execute(
            insert(t["jobs"]).values(
                _row(t["jobs"], id="j1", request_id="r1", model_id="m1", kind="ga", status="queued")
            )
        )
    engine.dispose()

    def columns_and_value(column: str) -> tuple[set[str], str]:
        engine = make_engine(database_url)
        try:
            names = {c["name"] for c in inspect(engine).get_columns("jobs")}
            with engine.connect() as conn:
                value = conn.execute(text(f"SELECT {column} FROM jobs WHERE id = 'j1'")).scalar()
            return names, value
        finally:
            engine.dispose()

    migrate.upgrade(database_url)
    names, value = columns_and_value("method")
    assert "method" in names and "kind" not in names and value == "ga"
    migrate.downgrade(database_url, "0007")
    names, value = columns_and_value("kind")
    assert "kind" in names and "method" not in names and value == "ga"
