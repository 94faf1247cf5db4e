"""The database lost mid-run (connections cut by a proxy we control): every route answers
503 `database-unavailable` with Retry-After, /readyz says which dependency is down in generic
words, and the service recovers by itself once the database is reachable again."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.service.netfaults import lethe_server, migrated_with_key, proxied_database, server_env

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

NO_DATABASE = {"/healthz", "/metrics", "/readyz", "/.well-known/jwks.json"}  # key files only


def _every_operation(base: str) -> list[tuple[str, str]]:
    spec = httpx.get(base + "/openapi.json", timeout=10).json()
    ops = []
    for path, methods in spec["paths"].items():
        for method in methods:
            ops.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path)))
    return ops


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def test_database_loss_is_503_everywhere_and_recovers(postgres_url: str, tmp_path: Path) -> None:
    secret = migrated_with_key(postgres_url, "ops")
    proxy, proxied = proxied_database(postgres_url)
    # Every key check reads the database here: with the key cache (LETHE_AUTH_CACHE_SECONDS) a
    # bodiless POST would rightly be a 422 before any database access, hiding the 503 path.
    env = server_env(tmp_path, database_url=proxied, auth_cache_seconds="0", metrics_auth="open")
    auth = {"Authorization": f"Bearer {secret}"}
    try:
        with lethe_server(env, tmp_path / "server.log") as (base, _proc):
            http = httpx.Client(base_url=base, timeout=30)
            assert http.get("/readyz").status_code == 200
            assert http.get("/v1/models", headers=auth).status_code == 200
            ops = _every_operation(base)
            assert len(ops) >= 20

            proxy.cut()
            for method, path in ops:
                r = http.request(method, path, headers=auth)
                if path in NO_DATABASE:
                    continue
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["type"] == "https://lethe.dev/problems/database-unavailable"
                assert int(r.headers["Retry-After"]) > 0
                assert str(proxy.port) not in r.text and "127.0.0.1" not in r.text
            assert http.get("/healthz").status_code == 200  # the process itself is alive
            assert http.get("/.well-known/jwks.json").status_code == 200  # receipts verifiable
            ready = http.get("/readyz")
            assert ready.status_code == 503 and "Retry-After" in ready.headers
            assert ready.json()["checks"]["database"] == "unavailable"
            assert ready.json()["detail"] == "database unavailable"
            assert str(proxy.port) not in ready.text and "127.0.0.1" not in ready.text
            # The driver's details are in the log, not in the answers.
            assert "database unavailable" in (tmp_path / "server.log").read_text()

            proxy.restore()  # no restart, no operator action
            assert _wait(lambda: http.get("/v1/models", headers=auth).status_code == 200)
            assert http.get("/readyz").json()["status"] == "ready"
            assert http.get("/v1/audit/verify", headers=auth).json()["ok"] is True
    finally:
        proxy.close()
