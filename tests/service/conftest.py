"""Fixtures for the service tests: migrated databases, sessions, data files and checkpoints."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service import migrate
from service.db import make_engine, make_session_factory


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """The parametrised (SQLite, PostgreSQL) database, upgraded to the migration head."""
    migrate.upgrade(database_url)
    return database_url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    eng = make_engine(migrated_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits: 1797 real 8x8 images, as float32 inputs and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)
