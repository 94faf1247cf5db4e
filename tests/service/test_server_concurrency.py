"""Against a real `lethe serve` (uvicorn) on PostgreSQL: idempotency under concurrency, no lost
submissions, and full/ranged checkpoint downloads over real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from service.api.auth import create_key
from service.storage import migrate
from service.storage.db import make_engine, make_session_factory, transaction
from service.storage.tables import DeletionRequest, Job
from tests.service.conftest import MLP_KWARGS, digits_npz, mlp_weights
from tests.service.netfaults import lethe_server, server_env

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def server(postgres_url: str, tmp_path: Path) -> Iterator[dict]:
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    with transaction(make_session_factory(engine)) as s:
        _, secret = create_key(s, scope="admin", name="load")
    env = server_env(tmp_path, database_url=postgres_url)
    try:
        with lethe_server(env, tmp_path / "server.log") as (base, _proc):
            yield {"base": base, "key": secret, "engine": engine}
    finally:
        engine.dispose()


def _setup(server: dict, digits) -> dict:
    headers = {"Authorization": f"Bearer {server['key']}"}
    with httpx.Client(base_url=server["base"], headers=headers, timeout=30) as c:
        ds = c.post(
            "/v1/datasets",
            data={"name": "digits", "kind": "tensor", "role": "train"},
            files={"file": ("d.npz", digits_npz(digits, 200))},
        )
        assert ds.status_code == 201, ds.text
        weights = mlp_weights()
        model = c.post(
            "/v1/models",
            data={
                "spec": json.dumps(
                    {"name": "digits-mlp", "architecture": "mlp", "arch_kwargs": MLP_KWARGS}
                )
            },
            files={"weights": ("w.safetensors", weights)},
        )
        assert model.status_code == 201, model.text
    return {
        "dataset": ds.json()["id"],
        "model": model.json(),
        "weights": weights,
        "headers": headers,
    }


async def _post_many(base: str, headers: dict, bodies: list[tuple[dict, dict]]) -> list:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *[
                client.post("/v1/deletion-requests", json=body, headers=headers | extra)
                for body, extra in bodies
            ]
        )


def test_concurrent_submissions_and_downloads(server: dict, digits) -> None:
    ctx = _setup(server, digits)
    factory = make_session_factory(server["engine"])
    twins = 8
    for round_ in range(twins):
        # Rounds of one key sent 100 times: a twin committing while another was being checked
        # once made the second see its own records held (a 422 instead of the replay).
        body = {
            "model": "digits-mlp",
            "dataset": ctx["dataset"],
            "record_keys": [f"digit-{round_}"],
        }
        same = asyncio.run(
            _post_many(
                server["base"], ctx["headers"], [(body, {"Idempotency-Key": f"one-{round_}"})] * 100
            )
        )
        assert [r.status_code for r in same] == [202] * 100, {r.text for r in same}
        assert len({r.json()["id"] for r in same}) == 1
        assert len({r.json()["job"]["id"] for r in same}) == 1
        assert len({r.headers["location"] for r in same}) == 1
    with factory() as s:
        assert s.execute(select(func.count()).select_from(DeletionRequest)).scalar() == twins
        assert s.execute(select(func.count()).select_from(Job)).scalar() == twins

    different = [
        (
            {"model": "digits-mlp", "dataset": ctx["dataset"], "record_keys": [f"digit-{i}"]},
            {"Idempotency-Key": f"key-{i}"},
        )
        for i in range(twins, twins + 50)
    ]
    answers = asyncio.run(_post_many(server["base"], ctx["headers"], different))
    assert [r.status_code for r in answers] == [202] * 50, [r.text for r in answers][:3]
    job_ids = {r.json()["job"]["id"] for r in answers}
    assert len(job_ids) == 50
    with factory() as s:
        rows = s.execute(select(Job.id, Job.submitted_seq)).all()
    assert len(rows) == twins + 50 and job_ids <= {r[0] for r in rows}
    assert sorted(r[1] for r in rows) == list(range(1, twins + 51))  # no gaps, no duplicates

    version = ctx["model"]["active_version"]
    url = f"/v1/model-versions/{version['id']}/checkpoint"
    with httpx.Client(base_url=server["base"], headers=ctx["headers"], timeout=30) as c:
        full = c.get(url)
        assert full.status_code == 200
        assert hashlib.sha256(full.content).hexdigest() == version["sha256"]
        assert full.headers["etag"].strip('"') == version["sha256"]
        size = int(full.headers["content-length"])
        assert size == len(ctx["weights"])
        step = max(1, size // 7)
        ranges = [(a, min(a + step, size) - 1) for a in range(0, size, step)]

    async def fetch_ranges() -> list[bytes]:
        async with httpx.AsyncClient(base_url=server["base"], timeout=30) as client:
            responses = await asyncio.gather(
                *[
                    client.get(url, headers=ctx["headers"] | {"Range": f"bytes={a}-{b}"})
                    for a, b in ranges
                ]
            )
        assert all(r.status_code == 206 for r in responses)
        return [r.content for r in responses]

    parts = asyncio.run(fetch_ranges())
    assert hashlib.sha256(b"".join(parts)).hexdigest() == version["sha256"]
