"""Broker mode: /readyz pings Redis, and a committed job's id is sent to the queue."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import load_settings
from tests.service.conftest import MLP_KWARGS, Api, digits_npz, mlp_weights

pytestmark = pytest.mark.redis


@pytest.fixture
def broker_settings(settings, redis_url: str, storage_dir):
    return load_settings(
        database_url=settings.database_url,
        storage_url=str(storage_dir),
        broker_url=redis_url,
        queue_name=f"lethe-test-{uuid.uuid4().hex[:8]}",
    )


def test_readyz_checks_the_broker(broker_settings, lethe_env) -> None:
    with TestClient(create_app(broker_settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["broker"] == "ok"


def test_only_broker_down_is_degraded_not_unready_and_submissions_queue(
    broker_settings, api_keys, lethe_env, digits
) -> None:
    """Readiness is 503 only when this instance cannot serve: with the broker down a
    submission is still accepted and kept queued, so /readyz says degraded with 200."""
    down = load_settings(
        database_url=broker_settings.database_url,
        storage_url=broker_settings.storage_url,
        broker_url="redis://127.0.0.1:1/0",
    )
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "degraded",
            "checks": {"database": "ok", "broker": "unavailable"},
        }
        assert "127.0.0.1" not in r.text and ":1" not in r.text  # generic words only
        api = Api(client, api_keys)
        ds = api.upload_dataset(digits_npz(digits, 50)).json()
        assert (
            api.register_model(
                {"name": "m", "architecture": "mlp", "arch_kwargs": MLP_KWARGS}, mlp_weights()
            ).status_code
            == 201
        )
        r = client.post(
            "/v1/deletion-requests",
            headers=api.h("submit"),
            json={"model": "m", "dataset": ds["id"], "record_keys": ["digit-3"]},
        )
        assert r.status_code == 202, r.text
        job = client.get(r.headers["Location"], headers=api.h("read")).json()
        assert job["status"] == "queued"


def test_submission_enqueues_job_id_after_commit(
    broker_settings, api_keys, redis_url: str, digits
) -> None:
    with TestClient(create_app(broker_settings)) as client:
        api = Api(client, api_keys)
        ds = api.upload_dataset(digits_npz(digits, 50)).json()
        assert (
            api.register_model(
                {"name": "m", "architecture": "mlp", "arch_kwargs": MLP_KWARGS}, mlp_weights()
            ).status_code
            == 201
        )
        r = client.post(
            "/v1/deletion-requests",
            headers=api.h("submit"),
            json={"model": "m", "dataset": ds["id"], "record_keys": ["digit-3"]},
        )
        assert r.status_code == 202
        job_id = r.json()["job"]["id"]
    conn = redis.Redis.from_url(redis_url)
    try:
        raw = conn.lrange(broker_settings.queue_name, 0, -1)
    finally:
        conn.close()
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == "lethe.run_job" and message["headers"]["id"] == job_id
    args = json.loads(base64.b64decode(message["body"]))[0]
    assert args == [job_id]


def _queued_ids(redis_url: str, queue: str) -> list[str]:
    conn = redis.Redis.from_url(redis_url)
    try:
        raw = conn.lrange(queue, 0, -1)
    finally:
        conn.close()
    # LPUSH puts the newest first: oldest first here.
    return [json.loads(m)["headers"]["id"] for m in reversed(raw)]


def test_only_the_head_of_a_line_gets_a_message(
    broker_settings, api_keys, redis_url: str, digits
) -> None:
    """A job behind another active job of its model is woken when its turn comes
    (service.domain.lines); cancelling the queued head wakes the job that waited behind it."""
    with TestClient(create_app(broker_settings)) as client:
        api = Api(client, api_keys)
        ds = api.upload_dataset(digits_npz(digits, 50)).json()
        for name in ("m", "other"):
            spec = {"name": name, "architecture": "mlp", "arch_kwargs": MLP_KWARGS}
            assert api.register_model(spec, mlp_weights()).status_code == 201

        def submit(model: str, key: str) -> str:
            r = client.post(
                "/v1/deletion-requests",
                headers=api.h("submit"),
                json={"model": model, "dataset": ds["id"], "record_keys": [key]},
            )
            assert r.status_code == 202, r.text
            return str(r.json()["job"]["id"])

        first, second, third = (submit("m", f"digit-{i}") for i in (1, 2, 3))
        assert _queued_ids(redis_url, broker_settings.queue_name) == [first]
        other = submit("other", "digit-4")  # another model's line: its own head
        assert _queued_ids(redis_url, broker_settings.queue_name) == [first, other]
        cancelled = client.post(f"/v1/jobs/{first}/cancel", headers=api.h("submit"))
        assert cancelled.status_code == 202, cancelled.text
        assert _queued_ids(redis_url, broker_settings.queue_name) == [first, other, second]
        # Cancelling a job that waits behind the head wakes nobody: the head still waits.
        assert client.post(f"/v1/jobs/{third}/cancel", headers=api.h("submit")).status_code == 202
        assert _queued_ids(redis_url, broker_settings.queue_name) == [first, other, second]
