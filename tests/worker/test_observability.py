"""Request ids from the API to the worker, JSON logs, and the worker's Prometheus endpoint:
jobs submitted through the real API (SQLite and PostgreSQL), run by the real runner in-process
and by a real `python -m worker.embedded` subprocess, metrics scraped over real HTTP."""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.logs import ContextFilter, JsonFormatter
from tests.worker.harness import (
    ONE_JOB_PER_REQUEST,
    Stack,
    Trained,
    WorkerProcess,
    api_stack,
    poll,
    stack_settings,
)
from worker.context import Outcome, RunnerContext
from worker.metrics_server import start_metrics_server
from worker.runner import run_job

PHASE_COUNT = re.compile(r'^lethe_job_phase_duration_seconds_count\{phase="(\w+)"\} (\S+)$', re.M)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def stack(lethe_env: Path, database_url: str, storage_dir: Path) -> Iterator[Stack]:
    settings = stack_settings(
        database_url=database_url, storage_dir=storage_dir, **ONE_JOB_PER_REQUEST
    )
    with api_stack(settings) as s:
        yield s


class _JsonLines(logging.Handler):
    """Lethe's JSON format and context filter on the root logger, lines kept in memory."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.addFilter(ContextFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def objects(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def json_logs() -> Iterator[_JsonLines]:
    handler = _JsonLines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _submit(stack: Stack, model: str, keys: list[str], headers: dict[str, str]) -> httpx.Response:
    body = {"model": model, "dataset": stack.models[model], "record_keys": keys}
    return stack.client.post(
        "/v1/deletion-requests", headers={**stack.headers, **headers}, json=body
    )


def test_request_id_is_echoed_stored_and_logged_by_the_worker(
    stack: Stack, trained: Trained, json_logs: _JsonLines
) -> None:
    model = stack.register(trained, "mlp")
    resp = _submit(stack, model, trained.train_ids[:5], {"X-Request-ID": "req-abc.123"})
    assert resp.status_code == 202, resp.text
    assert resp.headers["X-Request-ID"] == "req-abc.123"
    job_id = resp.json()["job"]["id"]
    assert stack.job_rows([job_id])[job_id].http_request_id == "req-abc.123"
    # The API's own line for the submission carries the id (set by the middleware, carried
    # into the endpoint's worker thread).
    accepted = [o for o in json_logs.objects() if "accepted" in str(o["message"])]
    assert accepted and accepted[-1]["request_id"] == "req-abc.123"
    assert set(accepted[-1]) >= {"timestamp", "level", "logger", "message"}

    # Without a header (or with one unfit to echo) the API makes one up, and stores that.
    plain = _submit(stack, model, trained.train_ids[5:8], {})
    made = plain.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    hostile = _submit(stack, model, trained.train_ids[8:11], {"X-Request-ID": "a b\x01" * 50})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["X-Request-ID"])
    plain_job = plain.json()["job"]["id"]
    assert stack.job_rows([plain_job])[plain_job].http_request_id == made
    # Every response carries one, errors included.
    assert "X-Request-ID" in stack.client.get("/v1/jobs/nope", headers=stack.headers).headers

    json_logs.lines.clear()
    assert run_job(RunnerContext.from_settings(stack.settings), job_id).outcome == (
        Outcome.SUCCEEDED
    )
    mine = [o for o in json_logs.objects() if o.get("job_id") == job_id]
    assert any("claimed" in str(o["message"]) for o in mine)
    # Once claimed, every line for the job names the HTTP request that created it.
    claimed_at = next(i for i, o in enumerate(mine) if "claimed" in str(o["message"]))
    assert all(o.get("request_id") == "req-abc.123" for o in mine[claimed_at:])
    assert any("succeeded" in str(o["message"]) for o in mine[claimed_at:])


def test_worker_metrics_endpoint_after_a_job(stack: Stack, trained: Trained) -> None:
    port = _free_port()
    settings = stack.settings.model_copy(
        update={"worker_metrics_port": port, "worker_metrics_addr": "127.0.0.1"}
    )
    model = stack.register(trained, "mlp")
    first = stack.submit(model, trained.train_ids[:5])
    stack.submit(model, trained.train_ids[5:10])  # stays queued: the queue depth is 1
    endpoint = start_metrics_server(settings, stack.sessions, ("database", lambda: 1))
    assert endpoint is not None
    try:
        before = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        counts_before = {p: float(n) for p, n in PHASE_COUNT.findall(before)}
        assert run_job(RunnerContext.from_settings(stack.settings), first).outcome == (
            Outcome.SUCCEEDED
        )
        resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        endpoint.close()
    assert resp.status_code == 200
    text = resp.text
    for family in ("lethe_jobs", "lethe_queue_depth", "lethe_job_phase_duration_seconds"):
        assert f"# TYPE {family} " in text
    assert 'lethe_jobs{status="succeeded"} 1.0' in text
    assert 'lethe_jobs{status="queued"} 1.0' in text
    assert 'lethe_queue_depth{queue="database"} 1.0' in text
    counts = {p: float(n) for p, n in PHASE_COUNT.findall(text)}
    # The job's attempt was observed once in each phase it went through.
    for phase in ("loading", "evaluating", "saving"):
        assert counts.get(phase, 0) == counts_before.get(phase, 0) + 1, (phase, counts)
    assert start_metrics_server(stack.settings, stack.sessions, ("x", lambda: 0)) is None


@pytest.mark.slow
def test_embedded_executor_json_logs_and_metrics(
    lethe_env: Path, sqlite_url: str, storage_dir: Path, trained: Trained, tmp_path: Path
) -> None:
    port = _free_port()
    settings = stack_settings(
        database_url=sqlite_url,
        storage_dir=storage_dir,
        log_format="json",
        worker_metrics_port=port,
        worker_metrics_addr="127.0.0.1",
    )
    log_path = tmp_path / "executor.log"
    with api_stack(settings) as stack:
        model = stack.register(trained, "mlp")
        executor = WorkerProcess.embedded(settings, log_path).start()
        try:
            resp = _submit(stack, model, trained.train_ids[:5], {"X-Request-ID": "ops-42"})
            job_id = resp.json()["job"]["id"]
            assert stack.wait([job_id], timeout=180)[job_id]["status"] == "succeeded"

            def scrape() -> str | None:
                try:
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                except httpx.TransportError:
                    return None
                return text if 'lethe_jobs{status="succeeded"} 1.0' in text else None

            text = poll(scrape, timeout=30, what="the executor's metrics endpoint")
        finally:
            executor.stop()
    assert 'lethe_queue_depth{queue="database"} 0.0' in text
    assert dict(PHASE_COUNT.findall(text)).get("loading") == "1.0"
    lines = [line for line in log_path.read_text().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert entries and all({"timestamp", "level", "logger", "message"} <= set(e) for e in entries)
    mine = [e for e in entries if e.get("job_id") == job_id]
    assert any("succeeded" in e["message"] and e.get("request_id") == "ops-42" for e in mine)
    assert any(e["logger"] == "lethe.embedded" for e in entries)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_celery_prefork_children_serve_metrics_and_log_json(
    lethe_env: Path,
    postgres_url: str,
    redis_url: str,
    storage_dir: Path,
    trained: Trained,
    tmp_path: Path,
) -> None:
    from service.devtools.localserver import lethe_command
    from tests.worker.harness import settings_env

    port = _free_port()  # and port + 1: one per pool child (index 0 and 1)
    settings = stack_settings(
        database_url=postgres_url,
        storage_dir=storage_dir,
        broker_url=redis_url,
        log_format="json",
        worker_metrics_port=port,
        worker_metrics_addr="127.0.0.1",
    )
    log_path = tmp_path / "worker.log"
    argv = lethe_command("worker", "--concurrency", "2", "--loglevel", "INFO")
    with api_stack(settings) as stack:
        model = stack.register(trained, "mlp")
        worker = WorkerProcess(argv, settings_env(settings), log_path).start()
        try:
            resp = _submit(stack, model, trained.train_ids[:5], {"X-Request-ID": "celery-7"})
            job_id = resp.json()["job"]["id"]
            assert stack.wait([job_id], timeout=240)[job_id]["status"] == "succeeded", (
                worker.log_text()[-3000:]
            )

            def scrape_both() -> list[str] | None:
                texts = []
                for child in (0, 1):
                    try:
                        url = f"http://127.0.0.1:{port + child}/metrics"
                        texts.append(httpx.get(url, timeout=5).text)
                    except httpx.TransportError:
                        return None
                return texts

            texts = poll(scrape_both, timeout=60, what="both pool children's endpoints")
        finally:
            worker.stop()
    for text in texts:
        assert 'lethe_jobs{status="succeeded"} 1.0' in text
        assert f'lethe_queue_depth{{queue="{settings.queue_name}"}} 0.0' in text
    # The child that ran the job observed its phases; the other has the family, no samples.
    loading = [float(dict(PHASE_COUNT.findall(t)).get("loading", 0)) for t in texts]
    assert sorted(loading) == [0.0, 1.0]
    entries = [
        json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")
    ]
    mine = [e for e in entries if e.get("job_id") == job_id]
    assert any("succeeded" in e["message"] and e.get("request_id") == "celery-7" for e in mine)
