"""Coalescing (worker.coalescing) against a real `lethe serve` (uvicorn) on PostgreSQL with a
real Celery worker and Redis: requests queued behind a running job share one run and one
version, each keeping its own status, evidence and receipt; requests that must not share a
run do not; a cancel before the run leaves the others; a worker killed mid-run still gives
one version. The model is the digits MLP registered with its recipe, the default release
policy, default request parameters.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bench.families import Family, family
from service.api.auth import create_key
from service.devtools.localserver import lethe_command
from service.storage import migrate
from service.storage.db import make_engine, make_session_factory, transaction
from tests.service.netfaults import lethe_server, server_env
from tests.worker.harness import WorkerProcess, poll, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

FINAL = ("completed", "needs_review", "failed", "cancelled", "rejected")


@pytest.fixture(scope="module")
def digits() -> Family:
    return family("digits-mlp")


class Service:
    def __init__(self, http: httpx.Client, worker: WorkerProcess, fam: Family) -> None:
        self.http, self.worker, self.fam = http, worker, fam
        self.train = ""

    def register(self, recipe: dict[str, Any] | None = None) -> None:
        def upload(name: str, role: str, content: bytes) -> str:
            resp = self.http.post(
                "/v1/datasets",
                data={"name": name, "kind": "tensor", "role": role},
                files={"file": (f"{name}.npz", content)},
            )
            assert resp.status_code == 201, resp.text
            return str(resp.json()["id"])

        self.train = upload("train", "train", self.fam.npz(None))
        evals = upload("eval", "eval", self.fam.npz(None, "eval"))
        recipe = {**(recipe or self.fam.recipe_json()), "datasets": [self.train]}
        spec = {
            "name": "mlp",
            "architecture": self.fam.architecture,
            "recipe": recipe,
            "arch_kwargs": self.fam.arch_kwargs,
            "eval_dataset": evals,
        }
        weights = self.fam.trained().weights["model"]
        resp = self.http.post(
            "/v1/models", data={"spec": json.dumps(spec)}, files={"weights": weights}
        )
        assert resp.status_code == 201, resp.text

    def submit(self, rows: list[int], **extra: Any) -> dict[str, Any]:
        body = {
            "model": "mlp",
            "dataset": self.train,
            "record_keys": [self.fam.ids[i] for i in rows],
            **extra,
        }
        resp = self.http.post("/v1/deletion-requests", json=body)
        assert resp.status_code == 202, resp.text
        return dict(resp.json())

    def request(self, request_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/deletion-requests/{request_id}").json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/jobs/{job_id}").json())

    def finished(self, ids: list[str], timeout: float = 300) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            views = {i: self.request(i) for i in ids}
            return views if all(v["status"] in FINAL for v in views.values()) else None

        views = poll(done, timeout=timeout)
        assert views, self.worker.log_text()[-3000:]
        return views

    def receipt(self, request_id: str) -> dict[str, Any]:
        url = f"/v1/deletion-requests/{request_id}/receipt"
        got = poll(lambda: (r := self.http.get(url)).status_code == 200 and r.json(), timeout=30)
        assert got, f"no receipt for {request_id}"
        return dict(got)

    def versions(self) -> list[dict[str, Any]]:
        return list(self.http.get("/v1/models/mlp/versions").json()["items"])


@pytest.fixture
def service(
    postgres_url: str, redis_url: str, tmp_path: Path, digits: Family, request
) -> Iterator[Service]:
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    with transaction(make_session_factory(engine)) as s:
        _, admin = create_key(s, scope="admin", name="admin")
    engine.dispose()
    extra: dict[str, str] = getattr(request, "param", {})
    env = server_env(
        tmp_path,
        database_url=postgres_url,
        broker_url=redis_url,
        queue_name=f"lethe-coalesce-{uuid.uuid4().hex[:8]}",
        lease_seconds="4",
        heartbeat_seconds="0.5",
        reaper_interval_seconds="0.5",
        superseded_retention_s="3600",
        **extra,
    )
    worker = WorkerProcess(lethe_command("worker", "--loglevel", "INFO"), env, tmp_path / "w.log")
    with lethe_server(env, tmp_path / "server.log") as (base, _proc):
        worker.start()
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=60
        ) as http:
            try:
                yield Service(http, worker, digits)
            finally:
                worker.stop()


def _blocker(svc: Service, **policy: Any) -> dict[str, Any]:
    """A request whose run keeps the model busy while the others queue behind it."""
    slow: dict[str, Any] = {"calibration": "off", "epochs": 10_000, "lr": 1e-6}
    if policy:
        slow["policy"] = policy
    blocker = svc.submit(list(range(200, 203)), method="ga", params=slow)
    wait_until(lambda: svc.request(blocker["id"])["status"] == "running", timeout=120)
    return blocker


def test_queued_requests_share_one_run_each_with_its_own_receipt(service: Service) -> None:
    svc, fam = service, service.fam
    svc.register()
    blocker = _blocker(svc)
    groups = [list(range(3 * i, 3 * i + 3)) for i in range(6)]
    requests = [svc.submit(rows) for rows in groups]
    # Not merged: other params, a human review, and a whole class (each runs alone).
    other_params = svc.submit(list(range(30, 33)), params={"clip_quantile": 0.9})
    review = svc.submit(list(range(33, 36)), params={"policy": {"require_review": True}})
    conflict = svc.http.post(
        "/v1/deletion-requests",
        json={"model": "mlp", "dataset": svc.train, "record_keys": [fam.ids[1], fam.ids[40]]},
    )
    assert conflict.status_code == 422, conflict.text
    assert [e["key"] for e in conflict.json()["errors"]] == [fam.ids[1]]
    ids = [r["id"] for r in requests]
    views = svc.finished([blocker["id"], *ids, other_params["id"], review["id"]])
    assert all(views[i]["status"] == "completed" for i in ids), [views[i]["policy"] for i in ids]
    jobs = [svc.job(r["job"]["id"]) for r in requests]
    shared = {j["result_version_id"] for j in jobs}
    assert len(shared) == 1, "the queued requests were not served by one run"
    version_id = shared.pop()
    leader = jobs[0]["id"]
    assert jobs[0]["served_by"] is None and all(j["served_by"] == leader for j in jobs[1:])
    # A served job carries the run's summary, not a copy of its per-key and per-record lists.
    run_size = len(json.dumps(jobs[0]["metrics"]))
    for served_job in jobs[1:]:
        metrics = served_job["metrics"]
        assert metrics["coalesced"] == {"requests": 6, "records": 18, "run_job_id": leader}
        assert "per_record_z" not in metrics["after"]["run_membership"]
        assert "kept_key_sha256" not in json.dumps(metrics["influence"])
        assert len(json.dumps(metrics)) < run_size
    # Requests that must not share a run did not.
    for alone in (other_params, review):
        job = svc.job(alone["job"]["id"])
        assert job["served_by"] is None and job["result_version_id"] != version_id
    assert views[review["id"]]["status"] == "needs_review"
    # Each request: its own evidence on its own 3 records, its own receipt naming the version.
    for request in requests:
        view = views[request["id"]]
        assert view["evidence"]["n"] == 3 and len(view["evidence"]["per_record_z"]) == 3
        receipt = svc.receipt(request["id"])["payload"]
        assert receipt["request"]["id"] == request["id"]
        assert receipt["result_version"]["id"] == version_id
        assert receipt["records"]["count"] == 3
        assert receipt["audit"]["events"] >= 4  # accepted, claimed or coalesced, succeeded, ...
    # The version's lineage and the audit name every request it served.
    lineage = svc.http.get(f"/v1/model-versions/{version_id}/lineage").json()["versions"][0]
    assert sorted(lineage["deletion_requests"]) == sorted(ids)
    assert len(lineage["record_key_sha256"]) == 18
    events = svc.http.get("/v1/audit", params={"action": "records.forgotten", "limit": 100})
    served = [e for e in events.json()["items"] if e["payload"].get("job_id") == leader]
    assert len(served) == 1 and sorted(served[0]["payload"]["request_ids"]) == sorted(ids)
    # The released model: forgot as a retrain without the 18 records would, works on held-out.
    union = [r for rows in groups for r in rows]
    released = fam.load(svc.http.get(f"/v1/model-versions/{version_id}/checkpoint").content)
    assert fam.heldout_acc(fam.model) - fam.heldout_acc(released) <= 0.03
    evidence = fam.evidence(released, union, class_wise=False)
    assert evidence.releases, evidence.as_dict()
    if views[ids[0]]["forgetting"] == "exact":
        gone = list(range(200, 203)) if views[blocker["id"]]["status"] == "completed" else []
        reference = fam.retrained(sorted(union + gone))
        with torch.no_grad():
            same = released(fam.x_eval).argmax(1) == reference(fam.x_eval).argmax(1)
        assert float(same.float().mean()) >= 0.97
    # One version per run: original, blocker, the shared run, other params, review candidate.
    assert len(svc.versions()) == 5


def test_a_request_cancelled_before_the_run_leaves_the_others(service: Service) -> None:
    svc = service
    svc.register()
    blocker = _blocker(svc)
    requests = [svc.submit(list(range(3 * i, 3 * i + 3))) for i in range(3)]
    cancelled = svc.http.post(f"/v1/jobs/{requests[1]['job']['id']}/cancel")
    assert cancelled.status_code in (200, 202), cancelled.text
    views = svc.finished([blocker["id"], *(r["id"] for r in requests)])
    assert [views[r["id"]]["status"] for r in requests] == ["completed", "cancelled", "completed"]
    first, third = svc.job(requests[0]["job"]["id"]), svc.job(requests[2]["job"]["id"])
    assert third["served_by"] == first["id"]
    assert first["result_version_id"] == third["result_version_id"]
    # The cancelled request's records were not forgotten: it can be submitted again.
    again = svc.submit(list(range(3, 6)))
    assert svc.finished([again["id"]])[again["id"]]["status"] == "completed"


@pytest.mark.parametrize("service", [{"coalesce_window_s": "3"}], indirect=True)
def test_a_worker_killed_mid_run_gives_one_version(service: Service) -> None:
    svc = service
    svc.register({**svc.fam.recipe_json(), "epochs": 1500})
    params = {"params": {}, "method": "retrain"}
    requests = [svc.submit(list(range(3 * i, 3 * i + 3)), **params) for i in range(4)]
    leader = requests[0]["job"]["id"]
    # The window makes the first job wait for the others; then one run serves all four.
    wait_until(
        lambda: (j := svc.job(leader))["phase"] == "retraining" and j["progress"] > 0.1,
        timeout=120,
        what="the shared retrain under way",
    )
    assert all(svc.job(r["job"]["id"])["served_by"] == leader for r in requests[1:])
    svc.worker.kill_group()
    svc.worker.start()
    views = svc.finished([r["id"] for r in requests], timeout=400)
    assert {v["status"] for v in views.values()} == {"completed"}, svc.worker.log_text()[-3000:]
    versions = sorted(svc.versions(), key=lambda v: v["number"])
    assert [v["number"] for v in versions] == [1, 2]
    assert {svc.job(r["job"]["id"])["result_version_id"] for r in requests} == {versions[1]["id"]}
    assert svc.job(leader)["attempts"] == 2


@pytest.mark.parametrize("service", [{"coalesce_max_records": "6"}], indirect=True)
def test_a_run_that_retrains_at_once_takes_in_more_than_an_approximate_one(
    service: Service,
) -> None:
    # LETHE_COALESCE_MAX_RECORDS=6 bounds a run that tries the approximate method; a retrain
    # costs the same however many records it drops, so it takes up to the exact bound.
    svc = service
    svc.register()
    blocker = _blocker(svc, require_review=True)  # held for review: not escalated
    # First in line: default requests, run when no retrain of the model was measured yet
    # (worker.routing knows no costs), so they try IMU first and keep the 6-record bound.
    approximate = [svc.submit(list(range(50 + 3 * i, 53 + 3 * i))) for i in range(4)]
    exact = [svc.submit(list(range(3 * i, 3 * i + 3)), method="retrain") for i in range(4)]
    views = svc.finished([blocker["id"], *(r["id"] for r in exact + approximate)], timeout=400)
    assert all(views[r["id"]]["status"] in ("completed", "needs_review") for r in exact)
    runs = [svc.job(r["job"]["id"]) for r in exact]
    assert runs[0]["served_by"] is None
    assert all(j["served_by"] == runs[0]["id"] for j in runs[1:]), "12 records in one retrain"
    assert runs[0]["metrics"]["coalesced"]["records"] == 12
    leaders = {svc.job(r["job"]["id"])["served_by"] or r["job"]["id"] for r in approximate}
    assert len(leaders) == 2
