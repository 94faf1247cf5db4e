"""Fixtures for the trust tests: a real API stack (SQLite or PostgreSQL) whose jobs run
in-process through the worker's runner, on small MLPs trained on scikit-learn digits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.worker.harness import (
    Stack,
    Trained,
    api_stack,
    production_policy,
    stack_settings,
    train_models,
)
from worker.context import Outcome, RunnerContext
from worker.runner import run_job

# The release policy a deployment runs with no LETHE_POLICY_* set.
PRODUCTION_POLICY = production_policy()


@pytest.fixture
def prod_stack(lethe_env: Path, database_url: str, storage_dir: Path) -> Iterator[Stack]:
    settings = stack_settings(
        database_url=database_url, storage_dir=storage_dir, **PRODUCTION_POLICY
    )
    with api_stack(settings) as s:
        yield s


@pytest.fixture(scope="session")
def trained() -> Trained:
    return train_models(n_train=600, epochs=20)


@pytest.fixture
def stack(lethe_env: Path, database_url: str, storage_dir: Path, request) -> Iterator[Stack]:
    """Parametrised over SQLite and PostgreSQL; `indirect` params override settings."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    settings = stack_settings(database_url=database_url, storage_dir=storage_dir, **overrides)
    with api_stack(settings) as s:
        yield s


@pytest.fixture
def sqlite_stack(lethe_env: Path, sqlite_url: str, storage_dir: Path, request) -> Iterator[Stack]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    settings = stack_settings(database_url=sqlite_url, storage_dir=storage_dir, **overrides)
    with api_stack(settings) as s:
        yield s


def run(stack: Stack, job_id: str, ctx: RunnerContext | None = None) -> Outcome:
    ctx = ctx or RunnerContext.from_settings(stack.settings, worker_id="trust-test:1:x")
    return run_job(ctx, job_id).outcome


def get(stack: Stack, path: str, **params: Any) -> Any:
    resp = stack.client.get(path, headers=stack.headers, params=params)
    return resp


def post(stack: Stack, path: str, **kwargs: Any) -> Any:
    return stack.client.post(path, headers=stack.headers, **kwargs)


def request_id_of(stack: Stack, job_id: str) -> str:
    return stack.job(job_id)["request_id"]
