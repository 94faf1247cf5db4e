"""The API suite; every test runs on SQLite and on PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import base64
import hashlib

from sqlalchemy import select, update

from service.storage.db import make_engine, make_session_factory, transaction
from service.storage.tables import AuditEvent, DeletionRequest, Job, ModelVersion, Record
from tests.service.conftest import MLP_KWARGS, Api, digits_npz, mlp_weights

PROBLEM = "application/problem+json"


def _db(settings):
    engine = make_engine(settings.db_url)
    return engine, make_session_factory(engine)


def _submit(api: Api, registered, keys, scope="submit", **extra):
    body = {"model": "digits-mlp", "dataset": registered["train"]["id"], "record_keys": keys}
    body.update(extra.pop("body", {}))
    return api.client.post("/v1/deletion-requests", json=body, headers=api.h(scope, **extra))


def test_dataset_upload_list_show_records(api: Api, digits) -> None:
    r = api.upload_dataset(digits_npz(digits, 120), name="digits small")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert {"id", "name", "kind", "role", "record_count", "sha256", "created_at"} <= set(ds)
    assert ds["record_count"] == 120 and ds["kind"] == "tensor" and ds["role"] == "train"
    assert ds["sha256"] == hashlib.sha256(digits_npz(digits, 120)).hexdigest()
    assert ds["meta"]["input_shape"] == [64]

    listed = api.client.get("/v1/datasets", headers=api.h("read")).json()
    assert [d["id"] for d in listed["items"]] == [ds["id"]] and listed["next_cursor"] is None
    shown = api.client.get(f"/v1/datasets/{ds['id']}", headers=api.h("read")).json()
    assert shown["state_counts"] == {"present": 120, "forgotten": 0}

    keys, cursor = [], None
    while True:
        params = {"limit": 50} | ({"cursor": cursor} if cursor else {})
        page = api.client.get(
            f"/v1/datasets/{ds['id']}/records", params=params, headers=api.h("read")
        ).json()
        keys += [item["key"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert keys == [f"digit-{i}" for i in range(120)]
    page = api.client.get(
        f"/v1/datasets/{ds['id']}/records?state=forgotten", headers=api.h("read")
    ).json()
    assert page == {"items": [], "next_cursor": None}
    bad = api.client.get("/v1/datasets?cursor=notacursor", headers=api.h("read"))
    assert bad.status_code == 422 and bad.json()["type"].endswith("/invalid-cursor")


def test_text_dataset(api: Api) -> None:
    content = b'{"id": "a", "text": "hello", "label": 1}\n{"id": "b", "text": "bye"}\n'
    r = api.upload_dataset(content, name="texts", kind="text", filename="t.jsonl")
    assert r.status_code == 201, r.text
    assert r.json()["record_count"] == 2


def test_model_registration_and_versions(api: Api, registered) -> None:
    model = registered["model"]
    v1 = model["active_version"]
    assert model["name"] == "digits-mlp" and model["architecture"] == "mlp"
    assert v1["number"] == 1 and v1["status"] == "active" and v1["parent_id"] is None
    assert v1["sha256"] == hashlib.sha256(registered["weights"]).hexdigest()
    assert v1["size_bytes"] == len(registered["weights"])

    shown = api.client.get(f"/v1/model-versions/{v1['id']}", headers=api.h("read")).json()
    expected = {
        "id",
        "model",
        "number",
        "parent_id",
        "job_id",
        "status",
        "sha256",
        "size_bytes",
        "metrics",
        "created_at",
    }
    assert expected <= set(shown) and shown["model"] == "digits-mlp" and shown["lineage"] == []
    versions = api.client.get("/v1/models/digits-mlp/versions", headers=api.h("read")).json()
    assert [v["number"] for v in versions["items"]] == [1]
    models = api.client.get("/v1/models", headers=api.h("read")).json()
    assert [m["name"] for m in models["items"]] == ["digits-mlp"]

    again = api.register_model(
        {"name": "digits-mlp", "architecture": "mlp", "arch_kwargs": MLP_KWARGS},
        registered["weights"],
    )
    assert again.status_code == 409 and again.json()["type"].endswith("/model-exists")
    missing = api.client.get("/v1/models/nope", headers=api.h("read"))
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM


def test_registration_refuses_mismatched_weights(api: Api, storage_dir) -> None:
    weights = mlp_weights(hidden=[16])  # spec says 32 hidden units
    r = api.register_model({"name": "m", "architecture": "mlp", "arch_kwargs": MLP_KWARGS}, weights)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["type"].endswith("/architecture-mismatch")
    mismatched = {m["key"]: m for m in body["mismatched"]}
    assert set(mismatched) == {"body.1.weight", "body.1.bias", "fc.weight"}
    assert mismatched["fc.weight"]["expected"]["shape"] == [10, 32]
    assert mismatched["fc.weight"]["got"]["shape"] == [10, 16]
    assert body["missing"] == [] and body["unexpected"] == []
    assert "fc.weight" in body["detail"]

    r = api.register_model(
        {"name": "m", "architecture": "mlp", "arch_kwargs": MLP_KWARGS | {"hidden": [32, 8]}},
        mlp_weights(),
    )
    assert r.status_code == 422 and r.json()["missing"] == ["body.3.weight", "body.3.bias"]
    assert [m["key"] for m in r.json()["mismatched"]] == ["fc.weight"]
    r = api.register_model(
        {"name": "m", "architecture": "mlp", "arch_kwargs": MLP_KWARGS},
        mlp_weights(hidden=[32, 8]),
    )
    assert r.status_code == 422
    assert sorted(r.json()["unexpected"]) == ["body.3.bias", "body.3.weight"]

    r = api.register_model({"name": "m", "architecture": "no-such-arch"}, mlp_weights())
    assert r.status_code == 422 and "no-such-arch" in r.json()["detail"]
    r = api.register_model(
        {"name": "m", "architecture": "mlp", "arch_kwargs": {"bogus": 1}}, mlp_weights()
    )
    assert r.status_code == 422 and "bogus" in r.json()["detail"]
    assert not list((storage_dir / "checkpoints").rglob("*.safetensors"))
    assert api.client.get("/v1/models", headers=api.h("read")).json()["items"] == []


def test_submit_poll_and_request(api: Api, registered) -> None:
    r = _submit(api, registered, ["digit-1", "digit-2"])
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == {"id", "status", "job"} and body["status"] == "queued"
    assert set(body["job"]) == {"id", "status"} and body["job"]["status"] == "queued"
    assert r.headers["location"] == f"/v1/jobs/{body['job']['id']}"

    job = api.client.get(r.headers["location"], headers=api.h("read")).json()
    for field in (
        "id",
        "status",
        "phase",
        "progress",
        "attempts",
        "error",
        "source_version_id",
        "result_version_id",
        "metrics",
        "created_at",
        "started_at",
        "finished_at",
    ):
        assert field in job
    assert job["status"] == "queued" and job["progress"] == 0 and job["error"] is None
    assert job["method"] == "imu" and "kind" not in job  # the method, named as on the request

    req = api.client.get(f"/v1/deletion-requests/{body['id']}", headers=api.h("read")).json()
    assert req["record_keys"] == ["digit-1", "digit-2"] and req["method"] == "imu"
    assert req["job"]["id"] == body["job"]["id"]

    audit = api.client.get(
        "/v1/audit", params={"action": "request.accepted"}, headers=api.h("read")
    ).json()
    assert [e["subject_id"] for e in audit["items"]] == [body["id"]]
    assert audit["items"][0]["payload"]["job_id"] == body["job"]["id"]
    verify = api.client.get("/v1/audit/verify", headers=api.h("read")).json()
    assert verify["ok"] is True and verify["checked"] >= 5  # 2 datasets, model, version, request


def test_submit_validation(api: Api, registered, settings) -> None:
    r = _submit(api, registered, ["digit-1", "nope-1", "nope-2"])
    assert r.status_code == 422 and r.json()["missing"] == ["nope-1", "nope-2"]
    assert {e["key"] for e in r.json()["errors"]} == {"nope-1", "nope-2"}

    r = _submit(api, registered, ["digit-1"], body={"model": "unknown"})
    assert r.status_code == 404

    assert _submit(api, registered, ["digit-5", "digit-6"]).status_code == 202
    r = _submit(api, registered, ["digit-6", "digit-7"])
    assert r.status_code == 422 and r.json()["pending"] == ["digit-6"]

    engine, factory = _db(settings)
    with transaction(factory) as s:
        s.execute(update(Record).where(Record.key == "digit-9").values(state="forgotten"))
    r = _submit(api, registered, ["digit-9"])
    assert r.status_code == 422 and r.json()["forgotten"] == ["digit-9"]

    r = _submit(api, registered, ["digit-10", "digit-10"])
    assert r.status_code == 422 and "duplicates" in r.json()["detail"]

    r = _submit(api, registered, ["digit-11"], body={"params": {"top_data": 5.0}})
    assert r.status_code == 422 and "top_data" in r.json()["detail"]
    r = _submit(api, registered, ["digit-11"], body={"params": {"nonsense": 1}})
    assert r.status_code == 422 and "nonsense" in r.json()["detail"]
    ga_off = {"method": "ga", "params": {"lr": 1e9, "calibration": "off"}}
    r = _submit(api, registered, ["digit-11"], body=ga_off)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "params.lr"
    # With calibration on (the default) the step size is the controller's to choose.
    r = _submit(api, registered, ["digit-11"], body={"params": {"lr": 0.1}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "params.lr"
    assert "calibration" in r.json()["detail"]
    # Every GA knob the engine has is accepted, weight decay included.
    ga = {
        "epochs": 2,
        "calibration": "off",
        "weight_decay": 0.0,
        "momentum": 0.5,
        "train_mode": False,
        "params": ["fc"],
    }
    r = _submit(api, registered, ["digit-11"], body={"method": "ga", "params": ga})
    assert r.status_code == 202, r.text
    r = _submit(
        api,
        registered,
        ["digit-12"],
        body={
            "params": {
                "epochs": 3,
                "calibration": "off",
                "top_data": 0.5,
                "policy": {"max_forget_acc": 0.3},
            }
        },
    )
    assert r.status_code == 202
    job = api.client.get(r.headers["location"], headers=api.h("read")).json()
    assert job["params"] == {
        "epochs": 3,
        "calibration": "off",
        "top_data": 0.5,
        "policy": {"max_forget_acc": 0.3},
    }

    r = _submit(api, registered, ["digit-13"], body={"method": "sgd"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "method"
    r = _submit(api, registered, [])
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "record_keys"

    with transaction(factory) as s:
        s.execute(update(ModelVersion).values(status="superseded"))
    r = _submit(api, registered, ["digit-14"])
    assert r.status_code == 409 and r.json()["type"].endswith("/no-active-version")
    engine.dispose()


def test_idempotency(api: Api, registered, settings) -> None:
    first = _submit(api, registered, ["digit-3"], **{"Idempotency-Key": "abc-123"})
    again = _submit(api, registered, ["digit-3"], **{"Idempotency-Key": "abc-123"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    other = _submit(api, registered, ["digit-4"], **{"Idempotency-Key": "abc-123"})
    assert other.status_code == 409 and other.json()["type"].endswith("/idempotency-key-reused")
    engine, factory = _db(settings)
    with factory() as s:
        assert len(s.execute(select(Job)).all()) == 1
        assert len(s.execute(select(DeletionRequest)).all()) == 1
    engine.dispose()


def test_jobs_list_and_cancel(api: Api, registered, settings) -> None:
    ids = [_submit(api, registered, [f"digit-{i}"]).json()["job"]["id"] for i in range(20, 25)]
    listed = api.client.get("/v1/jobs", params={"limit": 2}, headers=api.h("read")).json()
    assert [j["id"] for j in listed["items"]] == ids[::-1][:2] and listed["next_cursor"]
    rest = api.client.get(
        "/v1/jobs", params={"limit": 10, "cursor": listed["next_cursor"]}, headers=api.h("read")
    ).json()
    assert [j["id"] for j in rest["items"]] == ids[::-1][2:] and rest["next_cursor"] is None

    r = api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.h("submit"))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    req = api.client.get(f"/v1/deletion-requests/{r.json()['request_id']}", headers=api.h("read"))
    assert req.json()["status"] == "cancelled"
    r = api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.h("submit"))
    assert r.status_code == 409 and r.json()["type"].endswith("/job-finished")
    # The cancelled job's key may be requested again.
    assert _submit(api, registered, ["digit-20"]).status_code == 202

    engine, factory = _db(settings)
    with transaction(factory) as s:
        s.execute(update(Job).where(Job.id == ids[1]).values(status="running"))
    r = api.client.post(f"/v1/jobs/{ids[1]}/cancel", headers=api.h("submit"))
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    with factory() as s:
        actions = s.execute(select(AuditEvent.action).order_by(AuditEvent.seq)).scalars().all()
    assert actions[-2:] == ["request.accepted", "job.cancel_requested"]
    assert "job.cancelled" in actions
    engine.dispose()

    by_status = api.client.get(
        "/v1/jobs", params={"status": "cancelled", "model": "digits-mlp"}, headers=api.h("read")
    ).json()
    assert [j["id"] for j in by_status["items"]] == [ids[0]]
    assert api.client.get("/v1/jobs?status=weird", headers=api.h("read")).status_code == 422
    assert api.client.post("/v1/jobs/nope/cancel", headers=api.h("submit")).status_code == 404


def test_checkpoint_download(api: Api, registered) -> None:
    v1 = registered["model"]["active_version"]
    url = f"/v1/model-versions/{v1['id']}/checkpoint"
    weights = registered["weights"]
    full = api.client.get(url, headers=api.h("read"))
    assert full.status_code == 200 and full.content == weights
    assert full.headers["etag"] == f'"{v1["sha256"]}"'
    assert full.headers["content-length"] == str(len(weights))
    digest = base64.b64encode(hashlib.sha256(weights).digest()).decode()
    assert full.headers["repr-digest"] == f"sha-256=:{digest}:"

    parts, start, step = [], 0, 1000
    while start < len(weights):
        r = api.client.get(url, headers=api.h("read", Range=f"bytes={start}-{start + step - 1}"))
        assert r.status_code == 206
        end = min(start + step, len(weights)) - 1
        assert r.headers["content-range"] == f"bytes {start}-{end}/{len(weights)}"
        parts.append(r.content)
        start += step
    assert hashlib.sha256(b"".join(parts)).hexdigest() == v1["sha256"]

    tail = api.client.get(url, headers=api.h("read", Range="bytes=-10"))
    assert tail.status_code == 206 and tail.content == weights[-10:]
    bad = api.client.get(url, headers=api.h("read", Range=f"bytes={len(weights)}-"))
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(weights)}"
    cached = api.client.get(url, headers=api.h("read", **{"If-None-Match": f'"{v1["sha256"]}"'}))
    assert cached.status_code == 304 and cached.content == b""


def test_auth_and_scopes(api: Api, registered, settings) -> None:
    r = api.client.get("/v1/models")
    assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = api.client.get("/v1/models", headers={"Authorization": "Bearer lethe_wrong"})
    assert r.status_code == 401
    r = api.client.get("/v1/models", headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert r.status_code == 401
    r = _submit(api, registered, ["digit-1"], scope="read")
    assert r.status_code == 403 and r.json()["type"].endswith("/insufficient-scope")
    r = api.upload_dataset(b"x", scope="submit")
    assert r.status_code == 403
    assert _submit(api, registered, ["digit-1"], scope="admin").status_code == 202

    from service.api.auth import revoke_key

    engine, factory = _db(settings)
    with transaction(factory) as s:
        revoke_key(s, "test-read")
    engine.dispose()
    # Revocation takes effect within LETHE_AUTH_CACHE_SECONDS (the key cache's ttl).
    keys = api.client.app.state.lethe.keys
    now = keys.clock()
    keys.clock = lambda: now + keys.ttl + 0.001
    assert api.client.get("/v1/models", headers=api.h("read")).status_code == 401
    for path in ("/healthz", "/readyz"):
        assert api.client.get(path).status_code == 200
    # /metrics needs scope read by default (LETHE_METRICS_AUTH=read).
    assert api.client.get("/metrics").status_code == 401
    assert api.client.get("/metrics", headers=api.h("read")).status_code == 401  # revoked


def test_health_metrics_and_errors(api: Api, registered) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["database"] == "ok"
    _submit(api, registered, ["digit-1"])
    text = api.client.get("/metrics", headers=api.h("read")).text
    assert 'lethe_jobs{status="queued"} 1.0' in text
    assert (
        'lethe_http_requests_total{method="POST",route="/v1/deletion-requests",status="202"}'
        in text
    )

    r = api.client.get("/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert r.json()["type"] == "https://lethe.dev/problems/not-found"

    def boom() -> None:
        raise RuntimeError("secret internal detail")

    api.client.app.add_api_route("/boom", boom)
    r = api.client.get("/boom")
    assert r.status_code == 500 and r.headers["content-type"] == PROBLEM
    assert "secret" not in r.text and "Traceback" not in r.text
    assert r.json()["type"].endswith("/internal-error")

    schema = api.client.get("/openapi.json").json()
    assert "/v1/deletion-requests" in schema["paths"]
    assert "/v1/model-versions/{version_id}/checkpoint" in schema["paths"]
    job_out = schema["components"]["schemas"]["JobOut"]
    assert "method" in job_out["required"] and "kind" not in job_out["properties"]


def test_dataset_list_pagination_and_role_filter(api: Api, digits) -> None:
    ids = []
    for i, role in enumerate(("train", "eval", "train", "member_probe", "train")):
        r = api.upload_dataset(digits_npz(digits, 10, prefix=f"s{i}-"), name=f"ds{i}", role=role)
        assert r.status_code == 201
        ids.append(r.json()["id"])
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.client.get("/v1/datasets", params=params, headers=api.h("read")).json()
        assert len(page["items"]) <= 2
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]  # newest first, each exactly once
    trains = api.client.get("/v1/datasets?role=train", headers=api.h("read")).json()["items"]
    assert [d["id"] for d in trains] == [ids[4], ids[2], ids[0]]


def test_only_train_records_can_be_forgotten(api: Api, registered) -> None:
    body = {"model": "digits-mlp", "dataset": registered["eval"]["id"], "record_keys": ["eval-1"]}
    r = api.client.post("/v1/deletion-requests", json=body, headers=api.h("submit"))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "dataset"
    by_name = body | {"dataset": "digits"}  # a unique dataset name works as well as the id
    by_name["record_keys"] = ["digit-7"]
    r = api.client.post("/v1/deletion-requests", json=by_name, headers=api.h("submit"))
    assert r.status_code == 202
