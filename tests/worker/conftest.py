"""Fixtures for the worker tests: digits-trained models (once per session) and API stacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.harness import (
    Stack,
    Trained,
    api_stack,
    stack_settings,
    train_models,
)
from tests.worker.redis_server import ThrowawayRedis


@pytest.fixture(scope="session")
def trained() -> Trained:
    return train_models()


@pytest.fixture
def sqlite_stack(lethe_env: Path, sqlite_url: str, storage_dir: Path) -> Iterator[Stack]:
    """API on SQLite, embedded settings (no broker): jobs run wherever the test runs them."""
    settings = stack_settings(database_url=sqlite_url, storage_dir=storage_dir)
    with api_stack(settings) as stack:
        yield stack


@pytest.fixture
def pg_stack(lethe_env: Path, postgres_url: str, storage_dir: Path) -> Iterator[Stack]:
    settings = stack_settings(database_url=postgres_url, storage_dir=storage_dir)
    with api_stack(settings) as stack:
        yield stack


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
