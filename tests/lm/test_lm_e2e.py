"""End to end over HTTP: a real `lethe serve` (uvicorn + embedded worker process, SQLite,
production release policy) and a tiny Llama trained in this test session.

Register the LM with its JSONL texts, ask it to forget records with default params, poll,
download the new version (weights + config/tokenizer files), reload it with transformers and
check the metrics the job reported against the downloaded model. Then a request the policy
can release, and the refusals (422 problem+json) a client meets over the wire.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.devtools.localserver import LocalService
from tests.lm.lm_files import LMFiles, jsonl, spec
from worker.heldout import split_eval_keys

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp("lm-home")
    service = LocalService(
        home,
        env={
            "OMP_NUM_THREADS": "1",
            "LETHE_EMBEDDED_POLL_SECONDS": "0.2",
            "LETHE_TORCH_THREADS": "1",
        },
    )
    service.start()
    try:
        key = service.create_key("admin", "lm-e2e")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=service.url, headers=headers, timeout=60) as c:
            yield c
    finally:
        service.stop()
        assert not service.running


def _upload(c: httpx.Client, name: str, role: str, content: bytes) -> str:
    resp = c.post(
        "/v1/datasets",
        data={"name": name, "kind": "text", "role": role},
        files={"file": (f"{name}.jsonl", content, "application/x-ndjson")},
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _wait(c: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return dict(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {job}")


def _reload(c: httpx.Client, version_id: str, where: Path) -> torch.nn.Module:
    """The version as a team would use it: the files in a directory, from_pretrained."""
    from transformers import AutoModelForCausalLM

    where.mkdir()
    ckpt = c.get(f"/v1/model-versions/{version_id}/checkpoint")
    assert ckpt.status_code == 200
    (where / "model.safetensors").write_bytes(ckpt.content)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        got = c.get(f"/v1/model-versions/{version_id}/files/{name}")
        assert got.status_code == 200, got.text
        (where / name).write_bytes(got.content)
    model = AutoModelForCausalLM.from_pretrained(where, attn_implementation="eager")
    return model.eval()


def test_forget_over_http_and_reload_with_transformers(
    client: httpx.Client, lm: LMFiles, tmp_path: Path
) -> None:
    from tests.engine.lm_fixture import profiles
    from worker.imu.lm_data import tokenize
    from worker.imu.text_metrics import evaluate_lm

    c, fx = client, lm.fixture
    unseen = profiles(6, seed=987, prefix="u")  # in the train file, never trained on
    train_id = _upload(c, "profiles-train", "train", lm.train + jsonl(unseen))
    eval_id = _upload(c, "profiles-eval", "eval", lm.eval)
    probe_id = _upload(c, "profiles-probe", "member_probe", lm.probe)
    resp = c.post(
        "/v1/models",
        data={"spec": spec("profiles", eval_dataset=eval_id, member_probe_dataset=probe_id)},
        files=lm.form_files(),
    )
    assert resp.status_code == 201, resp.text
    v1 = resp.json()["active_version"]

    # 1. Forget memorised records, default params.
    keys = lm.forget_keys[:6]
    resp = c.post(
        "/v1/deletion-requests",
        json={"model": "profiles", "dataset": train_id, "record_keys": keys},
    )
    assert resp.status_code == 202, resp.text
    assert resp.headers["location"].startswith("/v1/jobs/")
    job = _wait(c, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job.get("error")
    metrics = job["metrics"]
    version = c.get(f"/v1/model-versions/{job['result_version_id']}").json()
    assert version["number"] == 2 and version["parent_id"] == v1["id"]
    policy = metrics["policy"]
    assert version["status"] == policy["decision"]
    # The measured outcome on this fixture (LANGUAGE_MODELS.md): retain-free ascent is not
    # selective, the guard stops it before the records are forgotten, and the policy holds
    # the result for review instead of releasing a model that still recites them.
    if metrics["after"]["forget"]["exact_recall"] > 0.05:
        assert version["status"] == "candidate" and "forget_recall" in policy["failed"]
        request = c.get(f"/v1/deletion-requests/{job['request_id']}").json()
        assert request["status"] == "needs_review"

    # 2. Reload the version with transformers; its metrics are the job's.
    model = _reload(c, version["id"], tmp_path / "v2")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    by_key = {
        e.key: e for e in [*fx.examples["forget"], *fx.examples["retain"], *fx.examples["heldout"]]
    }
    policy_half = split_eval_keys([e.key for e in fx.examples["heldout"]]).policy

    def batch(ks: list[str]) -> Any:
        return tokenize([by_key[k] for k in ks], fx.tokenizer, bos_id=1, pad_id=0, max_length=128)

    probe_keys = [e.key for e in fx.examples["retain"]]
    ev = evaluate_lm(model, batch(keys), batch(policy_half), batch(probe_keys))
    after = metrics["after"]
    assert ev["forget"]["exact_recall"] == pytest.approx(after["forget"]["exact_recall"])
    assert ev["member_probe"]["exact_recall"] == pytest.approx(
        after["member_probe"]["exact_recall"]
    )
    assert ev["heldout"]["perplexity"] == pytest.approx(after["heldout"]["perplexity"], rel=1e-4)
    assert ev["attacks"]["min_k_auc"] == pytest.approx(after["attacks"]["min_k_auc"], abs=1e-6)
    # Utility kept: the guard held perplexity and the retained records' recall.
    assert after["heldout"]["perplexity"] <= 1.1 * metrics["before"]["heldout"]["perplexity"]
    assert after["member_probe"]["exact_recall"] >= 0.9

    # 3. Records the model never learned: nothing to undo, every check passes, released.
    resp = c.post(
        "/v1/deletion-requests",
        json={"model": "profiles", "dataset": train_id, "record_keys": [e.key for e in unseen]},
    )
    job = _wait(c, resp.json()["job"]["id"])
    assert job["status"] == "succeeded" and job["metrics"]["policy"]["decision"] == "active"
    model = c.get("/v1/models/profiles").json()
    assert model["active_version"]["id"] == job["result_version_id"]
    assert model["active_version"]["parent_id"] == v1["id"]  # started from the active v1
    records = c.get(f"/v1/datasets/{train_id}/records", params={"state": "forgotten"}).json()
    assert sorted(r["key"] for r in records["items"]) == sorted(e.key for e in unseen)
    reloaded = _reload(c, job["result_version_id"], tmp_path / "v3")
    ids = batch(keys[:1]).ids
    with torch.no_grad():  # the weights did not move (target reached at the start)
        assert torch.allclose(
            reloaded(input_ids=ids).logits, fx.model(input_ids=ids).logits, atol=1e-5
        )


def test_refusals_over_http(client: httpx.Client, lm: LMFiles) -> None:
    c = client
    remote = json.dumps({**json.loads(lm.config), "auto_map": {"AutoModelForCausalLM": "x.M"}})
    unknown = json.dumps({**json.loads(lm.config), "model_type": "evil_lm"})
    layers = json.dumps({**json.loads(lm.config), "num_hidden_layers": 3})
    import pickle

    cases = [
        ({"config": remote.encode()}, "config", "remote code"),
        ({"config": unknown.encode()}, "config", "evil_lm"),
        ({"config": layers.encode()}, "weights", "do not match"),
        ({"weights": pickle.dumps({"w": [1.0]})}, "weights", "pickled checkpoints are refused"),
    ]
    for i, (replace, field, text) in enumerate(cases):
        resp = c.post(
            "/v1/models", data={"spec": spec(f"refused-{i}")}, files=lm.form_files(**replace)
        )
        assert resp.status_code == 422, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert text in resp.json()["detail"]
        assert field in {e["field"] for e in resp.json()["errors"]}
        assert c.get(f"/v1/models/refused-{i}").status_code == 404
    bad = lm.eval + b'{"id": "z", "prompt": "Who?"}\n'
    resp = c.post(
        "/v1/datasets",
        data={"name": "bad", "kind": "text", "role": "eval"},
        files={"file": ("b.jsonl", bad, "application/x-ndjson")},
    )
    assert resp.status_code == 422
    line = lm.eval.count(b"\n") + 1
    assert resp.json()["errors"] == [
        {"line": line, "field": "completion", "message": "must be a string, got NoneType"}
    ]
