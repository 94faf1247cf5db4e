"""Shared fixtures: fresh SQLite / PostgreSQL databases, an isolated Redis database, storage.

Isolation between test runs: every PostgreSQL database a run creates is named after the run
and dropped at the end; the run claims a Redis database number nobody else holds (a lock key
with a TTL inside that database), so two runs never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get(
    "LETHE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_HOST = os.environ.get("LETHE_TEST_REDIS", "redis://127.0.0.1:6379")
RUN_ID = uuid.uuid4().hex[:10]

# Keep torch to one thread per process: the machines that run this suite have 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: CUDA is not available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lethe.db'}"


def _pg_admin():
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A brand-new PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import text

    name = f"lethe_t_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Parametrised: the same test runs on SQLite and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lethe.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """Claim a Redis database number (1..15) for this run; released at the end."""
    import redis

    lock = f"lethe:test-run-lock:{RUN_ID}"
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{REDIS_HOST}/{db}")
        if client.set("lethe:test-run-lock", lock, nx=True, ex=3 * 3600):
            client.flushdb()
            client.set("lethe:test-run-lock", lock, ex=3 * 3600)
            try:
                yield db
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    raise RuntimeError("no free Redis database number (1..15) for this test run")


@pytest.fixture
def redis_url(redis_db: int) -> str:
    return f"{REDIS_HOST}/{redis_db}"


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path


@pytest.fixture
def lethe_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point every LETHE_ setting at a private home so nothing leaks between tests."""
    for var in list(os.environ):
        if var.startswith("LETHE_") and not var.startswith("LETHE_TEST_"):
            monkeypatch.delenv(var)
    home = tmp_path / "home"
    monkeypatch.setenv("LETHE_HOME", str(home))
    from service.settings import get_settings

    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()
