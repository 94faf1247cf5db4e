"""`lethe migrate`, `lethe keys ...`, `lethe audit verify`, `lethe serve` preflight, supervisor."""

from __future__ import annotations

import json
import sys
import time

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from service.cli import app
from service.storage.db import make_engine, make_session_factory, transaction

runner = CliRunner()


@pytest.fixture
def db_env(monkeypatch, lethe_env, database_url: str) -> str:
    monkeypatch.setenv("LETHE_DATABASE_URL", database_url)
    return database_url


def _run(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def test_migrate_then_keys_lifecycle(db_env: str) -> None:
    refused = _run("keys", "list", code=3)
    assert "lethe migrate" in refused.stderr
    assert "(head)" in _run("migrate").stdout
    assert "(head)" in _run("migrate").stdout  # idempotent

    created = _run("keys", "create", "--scope", "admin", "--name", "ops")
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("lethe_") and len(secret) > 30

    from service.api.auth import authenticate

    engine = make_engine(db_env)
    factory = make_session_factory(engine)
    with factory() as s:
        principal = authenticate(s, secret)
        assert principal is not None and principal.scope == "admin" and principal.name == "ops"

    listed = json.loads(_run("keys", "list", "--json").stdout)
    assert [(k["name"], k["scope"], k["revoked_at"]) for k in listed] == [("ops", "admin", None)]
    assert secret not in _run("keys", "list").stdout

    assert "already exists" in _run("keys", "create", "--name", "ops", code=2).stderr
    assert "unknown scope" in _run("keys", "create", "--scope", "root", code=2).stderr
    _run("keys", "revoke", "ops")
    assert "no key named" in _run("keys", "revoke", "ghost", code=2).stderr
    with factory() as s:
        assert authenticate(s, secret) is None

    verified = json.loads(_run("audit", "verify", "--json").stdout)
    assert verified["ok"] is True and verified["checked"] == 2  # key.created, key.revoked

    from service.storage.tables import AuditEvent

    with transaction(factory) as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 1).values(actor="mallory"))
    broken = json.loads(_run("audit", "verify", "--json", code=1).stdout)
    assert broken["ok"] is False and broken["first_bad_seq"] == 1
    engine.dispose()


def test_embedded_default_database_is_migrated_implicitly(lethe_env) -> None:
    secret = _run("keys", "create", "--scope", "read").stdout.strip().splitlines()[-1]
    assert secret.startswith("lethe_")
    assert (lethe_env / "lethe.db").exists()


def test_serve_refuses_configured_database_behind_head(db_env: str) -> None:
    result = _run("serve", "--no-executor", "--port", "1", code=3)
    assert "lethe migrate" in result.stderr


def test_executor_supervisor_restarts_and_stops() -> None:
    from service.cli.server import ExecutorSupervisor

    sup = ExecutorSupervisor([sys.executable, "-c", "import time; time.sleep(0.3)"], env={})
    sup.start()
    deadline = time.monotonic() + 20
    while sup.restarts < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sup.restarts >= 1  # the child exited and was started again
    long_lived = ExecutorSupervisor([sys.executable, "-c", "import time; time.sleep(60)"], env={})
    long_lived.start()
    while long_lived.proc is None:
        time.sleep(0.05)
    proc = long_lived.proc
    long_lived.stop(timeout=5)
    sup.stop(timeout=5)
    assert proc.poll() is not None  # terminated with the server
