"""Deletion requests on a causal LM, run by the worker's runner in-process (TestClient): the
phases, the text metrics, the LM release policy and the saved version's format, on SQLite
and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lm.lm_files import LMFiles, spec
from tests.trust.conftest import get, post, run
from tests.worker.harness import Stack, api_stack, stack_settings
from worker.context import Outcome

PRODUCTION = {
    "policy_max_eval_acc_drop": 0.05,
    "policy_max_forget_acc": 0.2,
    "policy_max_forget_auc_excess": 0.0,
}


@pytest.fixture
def stack(lethe_env: Path, database_url: str, storage_dir: Path) -> Iterator[Stack]:
    """SQLite and PostgreSQL (the JSON metrics and JSONL purge on both)."""
    settings = stack_settings(database_url=database_url, storage_dir=storage_dir, **PRODUCTION)
    with api_stack(settings) as s:
        yield s


def _upload(stack: Stack, name: str, role: str, content: bytes) -> str:
    resp = post(
        stack,
        "/v1/datasets",
        data={"name": name, "kind": "text", "role": role},
        files={"file": (f"{name}.jsonl", content, "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def register(stack: Stack, lm: LMFiles, name: str, train: bytes | None = None) -> str:
    train_id = _upload(stack, f"{name}-train", "train", train or lm.train)
    eval_id = _upload(stack, f"{name}-eval", "eval", lm.eval)
    probe_id = _upload(stack, f"{name}-probe", "member_probe", lm.probe)
    resp = post(
        stack,
        "/v1/models",
        data={"spec": spec(name, eval_dataset=eval_id, member_probe_dataset=probe_id)},
        files=lm.form_files(),
    )
    assert resp.status_code == 201, resp.text
    stack.models[name] = train_id
    return name


def test_default_request_runs_and_the_policy_judges_text_metrics(stack: Stack, lm: LMFiles) -> None:
    model = register(stack, lm, "profiles")
    keys = lm.forget_keys[:6]
    job = stack.submit(model, keys)
    assert run(stack, job) == Outcome.SUCCEEDED
    view = stack.job(job)
    metrics = view["metrics"]
    before, after, policy = metrics["before"], metrics["after"], metrics["policy"]
    # Metrics per split, as the issue lists them.
    for split in ("forget", "heldout", "member_probe"):
        assert {"perplexity", "nll", "token_accuracy", "exact_recall", "min_k"} <= set(
            before[split]
        )
    assert set(before["attacks"]) == {"loss_auc", "zlib_auc", "min_k_auc", "auc_limit"}
    assert before["forget"]["exact_recall"] == 1.0 and before["attacks"]["min_k_auc"] > 0.9
    assert before["n_forget"] == 6 and before["n_eval"] == metrics["eval_split"]["n_policy"]
    assert after["peak_rss_mib"] > 0 and after["eval_seconds"] >= 0
    calibration = metrics["influence"]["calibration"]
    # The five phases ran (IMU's influence pass included) and were timed.
    assert {"loading", "influence", "unlearning", "evaluating", "saving"} <= set(view["timings"])
    assert metrics["influence"]["influence"]["theta_numel"] > 0
    assert metrics["influence"]["config"]["loss"] == "npo"  # the measured default
    assert calibration["mode"] == "auto" and calibration["trajectory"]
    assert policy["mode"] == "text"
    names = [c["name"] for c in policy["checks"]]
    assert names == [
        "forget_recall",
        "forget_indistinguishable",
        "heldout_ppl_rise",
        "probe_recall_drop",
    ]
    v1, v2 = stack.versions(model)
    checks = {c["name"]: c for c in policy["checks"]}
    expected = "active" if not policy["failed"] else "candidate"
    assert v2["status"] == expected and policy["decision"] == expected
    if expected == "candidate":
        assert v1["status"] == "active"
        request = get(stack, f"/v1/deletion-requests/{view['request_id']}").json()
        assert request["status"] == "needs_review"
        assert set(stack.record_states(stack.models[model], keys).values()) == {"present"}
    # Whatever the verdict, the guard kept utility: no destroyed model was produced.
    assert checks["heldout_ppl_rise"]["value"] <= 0.25, checks
    # The saved version has the registered layout (tied lm_head stored once).
    from worker.imu.checkpoints import read_header

    ckpt = get(stack, f"/v1/model-versions/{v2['id']}/checkpoint")
    assert ckpt.status_code == 200
    assert set(read_header(ckpt.content)) == set(read_header(lm.weights))
    files = get(stack, f"/v1/model-versions/{v2['id']}/files/config.json")
    assert json.loads(files.content) == json.loads(lm.config)
    if expected == "candidate":  # a reviewer may still release it: records forgotten, purged
        assert post(stack, f"/v1/model-versions/{v2['id']}/promote").status_code == 200
        assert set(stack.record_states(stack.models[model], keys).values()) == {"forgotten"}
        assert stack.versions(model)[1]["status"] == "active"


def test_lm_params_are_validated_at_submission(stack: Stack, lm: LMFiles) -> None:
    model = register(stack, lm, "params")
    body = {"model": model, "dataset": stack.models[model], "record_keys": lm.forget_keys[:2]}
    for params, field in (
        ({"loss": "hinge"}, "params.loss"),
        ({"recall_target": 2}, "params.recall_target"),
        ({"method": "ga"}, "params.method"),
        ({"lora_targets": []}, "params.lora_targets"),
        ({"lora_rank": 4, "params": ["model.layers.1"]}, "params.params"),
    ):
        resp = post(stack, "/v1/deletion-requests", json={**body, "params": params})
        assert resp.status_code == 422, resp.text
        assert resp.json()["errors"][0]["field"] == field, resp.json()
    ok = post(stack, "/v1/deletion-requests", json={**body, "params": {"loss": "npo"}})
    assert ok.status_code == 202, ok.text


def test_records_the_model_never_learned_are_released_and_purged(
    stack: Stack, lm: LMFiles, storage_dir: Path
) -> None:
    """Profiles the model never saw, registered in its training set: nothing to unlearn
    (target-at-start), every check passes, the version is active and the texts are purged."""
    from tests.engine.lm_fixture import profiles
    from tests.lm.lm_files import jsonl

    unseen = profiles(6, seed=987, prefix="u")
    model = register(stack, lm, "unseen", train=lm.train + jsonl(unseen))
    keys = [e.key for e in unseen]
    job = stack.submit(model, keys)
    assert run(stack, job) == Outcome.SUCCEEDED
    metrics = stack.job(job)["metrics"]
    assert metrics["influence"]["calibration"]["reason"] == "target-at-start"
    assert metrics["policy"]["decision"] == "active", metrics["policy"]["reasons"]
    v1, v2 = stack.versions(model)
    assert (v1["status"], v2["status"]) == ("superseded", "active")
    assert set(stack.record_states(stack.models[model], keys).values()) == {"forgotten"}
    stored = b"".join(p.read_bytes() for p in (storage_dir / "datasets").rglob("*.jsonl"))
    assert unseen[0].completion and unseen[0].completion.encode() not in stored
    assert lm.fixture.examples["forget"][0].key.encode() in stored  # the rest is kept
    # A signed erasure receipt, as for classifiers, with the text metrics.
    view = stack.job(job)
    receipt = get(stack, f"/v1/deletion-requests/{view['request_id']}/receipt")
    assert receipt.status_code == 200, receipt.text
    payload = receipt.json()["payload"]
    assert payload["records"]["count"] == len(keys)
    assert payload["result_version"]["sha256"] == v2["sha256"]
    assert payload["metrics"]["after"]["forget"]["exact_recall"] == 0.0


def test_a_theta_too_large_for_the_memory_bound_fails_once_with_a_clear_error(
    stack: Stack, lm: LMFiles
) -> None:
    model = register(stack, lm, "bounded")
    # Every parameter (0.34 M floats = 1.35 MB per record) against a 1 MiB chunk bound.
    job = stack.submit(
        model, lm.forget_keys[:3], params={"params": ["model"], "chunk_bytes": 1 << 20}
    )
    assert run(stack, job) == Outcome.FAILED
    view = stack.job(job)
    assert view["error"]["type"].endswith("/invalid-params"), view["error"]
    assert "exceeds the chunk bound" in view["error"]["detail"]
    assert view["attempts"] == 1  # deterministic: not retried
    (v1,) = stack.versions(model)
    assert v1["status"] == "active"


def test_without_eval_or_probe_texts_nothing_is_released(stack: Stack, lm: LMFiles) -> None:
    train_id = _upload(stack, "solo-train", "train", lm.train)
    resp = post(stack, "/v1/models", data={"spec": spec("solo")}, files=lm.form_files())
    assert resp.status_code == 201, resp.text
    stack.models["solo"] = train_id
    job = stack.submit("solo", lm.forget_keys[:2])
    assert run(stack, job) == Outcome.SUCCEEDED
    metrics = stack.job(job)["metrics"]
    assert metrics["influence"]["calibration"]["reason"] == "no-heldout-data"
    policy = metrics["policy"]
    assert policy["decision"] == "candidate"
    assert policy["failed"] == [
        "forget_recall",
        "forget_indistinguishable",
        "heldout_ppl_rise",
        "probe_recall_drop",
    ]
    assert sum("not measured" in r for r in policy["reasons"]) == 3


def test_a_bf16_checkpoint_stays_bf16_with_its_keys(stack: Stack, lm: LMFiles) -> None:
    """Versions keep the registered layout: dtypes, and a tied weight stored under both names."""
    import torch

    from worker.imu.checkpoints import read_header, to_bytes

    state = {k: v.to(torch.bfloat16) for k, v in lm.fixture.model.state_dict().items()}
    assert "lm_head.weight" in state  # both names of the tied embedding, as some exports do
    weights = to_bytes(state)
    train_id = _upload(stack, "bf16-train", "train", lm.train)
    eval_id = _upload(stack, "bf16-eval", "eval", lm.eval)
    resp = post(
        stack,
        "/v1/models",
        data={"spec": spec("bf16", eval_dataset=eval_id)},
        files=lm.form_files(weights=weights),
    )
    assert resp.status_code == 201, resp.text
    stack.models["bf16"] = train_id
    job = stack.submit("bf16", lm.forget_keys[:2])
    assert run(stack, job) == Outcome.SUCCEEDED
    v2 = stack.versions("bf16")[1]
    saved = read_header(get(stack, f"/v1/model-versions/{v2['id']}/checkpoint").content)
    assert saved == read_header(weights)  # same keys, shapes and dtypes (BF16)


def test_a_lora_request_saves_a_plain_model(stack: Stack, lm: LMFiles) -> None:
    from worker.imu.checkpoints import read_header

    model = register(stack, lm, "lora")
    job = stack.submit(model, lm.forget_keys[:3], params={"lora_rank": 4})
    assert run(stack, job) == Outcome.SUCCEEDED
    stats = stack.job(job)["metrics"]["influence"]
    assert stats["lora"]["merged"] and stats["config"]["lora_rank"] == 4
    assert all(".lora_" in name for name in stats["influence"]["theta"])
    v2 = stack.versions(model)[1]
    saved = read_header(get(stack, f"/v1/model-versions/{v2['id']}/checkpoint").content)
    assert saved == read_header(lm.weights)
