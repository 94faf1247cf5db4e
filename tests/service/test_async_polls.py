"""GET /v1/jobs/{id} on PostgreSQL reads on the event loop (service.storage.async_reads):
the same answer as the thread-pool read, 503 when the database is cut or silent, a loop that
stays free meanwhile, and recovery without a restart. Real PostgreSQL, a real
`lethe serve` behind a TCP proxy we control."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text, update

from service.domain.jobs import show_job
from service.errors import NotFound
from service.storage.db import make_engine, make_session_factory, transaction
from service.storage.tables import Job
from tests.service.netfaults import lethe_server, migrated_with_key, proxied_database, server_env
from tests.worker.harness import api_stack, stack_settings

pytestmark = [pytest.mark.postgres]


def test_a_poll_answers_as_the_thread_pool_read_does(
    lethe_env: Path, postgres_url: str, storage_dir: Path
) -> None:
    from bench.families import family

    fam = family("digits-shifted-mlp")
    with api_stack(stack_settings(database_url=postgres_url, storage_dir=storage_dir)) as stack:
        assert stack.client.app.state.lethe.async_reads is not None
        model = stack.register(fam.trained(), "model")
        job = stack.submit(model, fam.ids[:3])
        started = datetime(2026, 12, 4, 8, 30, tzinfo=UTC)
        with transaction(stack.sessions) as session:  # every kind of column, set
            session.execute(
                update(Job)
                .where(Job.id == job)
                .values(
                    status="failed",
                    phase="unlearning",
                    progress=0.5,
                    metrics={"before": {"eval_acc": 0.9, "per_class_acc": [0.5, None]}},
                    timings={"loading": 0.25},
                    error={"type": "x", "title": "T", "status": 500, "detail": "ünïcode"},
                    started_at=started,
                    finished_at=started + timedelta(seconds=3),
                )
            )
        polled = stack.client.get(f"/v1/jobs/{job}", headers=stack.headers)
        assert polled.status_code == 200
        read = show_job(stack.sessions, job)
        assert polled.json()["started_at"] == "2026-12-04T08:30:00Z"
        assert polled.json()["error"]["detail"] == "ünïcode"
        for key, value in read.items():
            assert polled.json()[key] == value, key
        # The server ends every pooled connection (a restart, an operator): the next poll
        # still answers, on a new connection, without a 503.
        with stack.sessions() as session:
            session.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        time.sleep(0.2)
        again = stack.client.get(f"/v1/jobs/{job}", headers=stack.headers)
        assert again.status_code == 200, again.text
        assert again.json() == polled.json()
        missing = stack.client.get("/v1/jobs/nope", headers=stack.headers)
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"


@pytest.mark.slow
def test_a_poll_is_503_when_the_database_is_cut_or_silent_and_recovers(
    postgres_url: str, tmp_path: Path
) -> None:
    secret = migrated_with_key(postgres_url, "ops")
    proxy, proxied = proxied_database(postgres_url)
    env = server_env(tmp_path, database_url=proxied, db_timeout_s="2")
    auth = {"Authorization": f"Bearer {secret}"}
    try:
        with lethe_server(env, tmp_path / "server.log") as (base, _proc):
            http = httpx.Client(base_url=base, timeout=30)
            assert http.get("/v1/jobs/nope", headers=auth).status_code == 404  # key now cached

            def unavailable(r: httpx.Response) -> None:
                assert r.status_code == 503, r.text
                assert r.json()["type"] == "https://lethe.dev/problems/database-unavailable"
                assert int(r.headers["Retry-After"]) > 0
                assert str(proxy.port) not in r.text and "127.0.0.1" not in r.text

            def recovered() -> None:  # no restart, no operator action
                deadline = time.monotonic() + 30
                while http.get("/v1/jobs/nope", headers=auth).status_code != 404:
                    assert time.monotonic() < deadline, "polls did not recover"
                    time.sleep(0.25)

            proxy.cut()
            unavailable(http.get("/v1/jobs/nope", headers=auth))

            proxy.restore()
            recovered()

            # Silent: the poll waits at most its bound, and the loop serves others meanwhile.
            proxy.silence()
            answers: list[tuple[httpx.Response, float]] = []

            def poll() -> None:
                t0 = time.monotonic()
                answers.append((http.get("/v1/jobs/nope", headers=auth), time.monotonic() - t0))

            worker = threading.Thread(target=poll)
            worker.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            assert httpx.get(base + "/healthz", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 1.0  # not stuck behind the hung round trip
            worker.join(30)
            ((answer, seconds),) = answers
            unavailable(answer)
            assert seconds < 2 * 2 + 1  # within the bound (2 s), a hung pool wait included

            proxy.restore()
            recovered()
    finally:
        proxy.close()


def test_the_sync_read_is_the_reference(postgres_url: str) -> None:
    """The thread-pool read (SQLite, and any caller without a loop) still answers 404."""
    engine = make_engine(postgres_url)
    try:
        from service.storage import migrate

        migrate.upgrade(postgres_url)
        with pytest.raises(NotFound, match="job 'nope' does not exist") as raised:
            show_job(make_session_factory(engine), "nope")
        assert raised.value.code == "not-found"  # the API answers it 404
    finally:
        engine.dispose()
