"""Release policy: active at once, candidate → promote, candidate → reject, stale candidates,
per-request overrides validated at submission, and lineage back to version 1."""

from __future__ import annotations

import hashlib

import pytest

from tests.trust.conftest import get, post, request_id_of, run
from tests.worker.harness import Stack, Trained
from worker.context import Outcome


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _submit(stack: Stack, model: str, keys: list[str], policy: dict | None = None) -> str:
    return stack.submit(model, keys, params={"policy": policy} if policy else None)


def _request(stack: Stack, job_id: str) -> dict:
    resp = get(stack, f"/v1/deletion-requests/{request_id_of(stack, job_id)}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _version(stack: Stack, version_id: str) -> dict:
    resp = get(stack, f"/v1/model-versions/{version_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_within_policy_is_active_and_lineage_goes_back_to_version_1(
    stack: Stack, trained: Trained
) -> None:
    model = stack.register(trained, "mlp")
    keys_a, keys_b = trained.train_ids[:5], trained.train_ids[5:12]
    job_a = _submit(stack, model, keys_a)
    assert run(stack, job_a) == Outcome.SUCCEEDED
    job_b = _submit(stack, model, keys_b)
    assert run(stack, job_b) == Outcome.SUCCEEDED
    v1, v2, v3 = stack.versions(model)
    assert [v1["status"], v2["status"], v3["status"]] == ["superseded", "superseded", "active"]
    assert v3["metrics"]["policy"]["decision"] == "active"
    assert _request(stack, job_b)["status"] == "completed"

    resp = get(stack, f"/v1/model-versions/{v3['id']}/lineage")
    assert resp.status_code == 200, resp.text
    chain = resp.json()["versions"]
    assert [e["number"] for e in chain] == [3, 2, 1]
    assert [e["sha256"] for e in chain] == [v3["sha256"], v2["sha256"], v1["sha256"]]
    assert chain[0]["job_id"] == job_b and chain[1]["job_id"] == job_a
    assert chain[0]["deletion_request"]["id"] == request_id_of(stack, job_b)
    assert chain[0]["record_key_sha256"] == [_sha(k) for k in keys_b]
    assert chain[1]["record_key_sha256"] == [_sha(k) for k in keys_a]
    assert chain[0]["records_forgotten"] and chain[1]["records_forgotten"]
    assert "eval_acc" in chain[0]["metrics"]["after"]
    assert chain[2]["deletion_request"] is None and chain[2]["record_key_sha256"] == []
    assert get(stack, "/v1/model-versions/nope/lineage").status_code == 404


def test_candidate_then_promote(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    keys = trained.train_ids[:6]
    job = _submit(stack, model, keys, {"require_review": True})
    assert run(stack, job) == Outcome.SUCCEEDED
    v1, v2 = stack.versions(model)
    assert v2["status"] == "candidate" and v1["status"] == "active"
    assert v2["metrics"]["policy"]["failed"] == ["require_review"]
    assert stack.job(job)["status"] == "succeeded"
    assert _request(stack, job)["status"] == "needs_review"
    # Nothing is forgotten until a version without the records is active.
    assert set(stack.record_states(stack.models[model], keys).values()) == {"present"}
    assert v1["checkpoint_available"] and v2["checkpoint_available"]
    # The keys cannot be named again while the candidate awaits review.
    again = post(
        stack,
        "/v1/deletion-requests",
        json={"model": model, "dataset": stack.models[model], "record_keys": keys[:2]},
    )
    assert again.status_code == 422, again.text
    assert {e["message"] for e in again.json()["errors"]} == {"named by a request awaiting review"}
    # A receipt exists only for completed requests.
    rid = request_id_of(stack, job)
    assert get(stack, f"/v1/deletion-requests/{rid}/receipt").status_code == 409

    read_only = {"Authorization": f"Bearer {_key(stack, 'submit')}"}
    denied = stack.client.post(f"/v1/model-versions/{v2['id']}/promote", headers=read_only)
    assert denied.status_code == 403

    promoted = post(stack, f"/v1/model-versions/{v2['id']}/promote")
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["status"] == "active"
    v1 = _version(stack, v1["id"])
    assert v1["status"] == "superseded" and v1["retired_at"] is not None
    assert not v1["checkpoint_available"]
    assert _request(stack, job)["status"] == "completed"
    assert set(stack.record_states(stack.models[model], keys).values()) == {"forgotten"}
    assert get(stack, f"/v1/deletion-requests/{rid}/receipt").status_code == 200
    actions = [e["action"] for e in get(stack, "/v1/audit", subject=v2["id"]).json()["items"]]
    assert actions == ["version.created", "version.promoted"]
    # Promoting twice, or rejecting an active version, is a conflict.
    again = post(stack, f"/v1/model-versions/{v2['id']}/promote")
    assert again.status_code == 409 and again.json()["type"].endswith("/version-not-candidate")
    assert post(stack, f"/v1/model-versions/{v2['id']}/reject").status_code == 409
    # The next job starts from the promoted version.
    nxt = _submit(stack, model, trained.train_ids[6:10])
    assert run(stack, nxt) == Outcome.SUCCEEDED
    assert stack.versions(model)[-1]["parent_id"] == v2["id"]


def test_candidate_then_reject(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    keys = trained.train_ids[:6]
    job = _submit(stack, model, keys, {"require_review": True})
    assert run(stack, job) == Outcome.SUCCEEDED
    v1, v2 = stack.versions(model)
    rejected = post(stack, f"/v1/model-versions/{v2['id']}/reject")
    assert rejected.status_code == 200, rejected.text
    body = rejected.json()
    assert body["status"] == "rejected" and body["retired_at"] is not None
    assert not body["checkpoint_available"]
    gone = get(stack, f"/v1/model-versions/{v2['id']}/checkpoint")
    assert gone.status_code == 410
    assert gone.headers["content-type"].startswith("application/problem+json")
    assert gone.json()["sha256"] == v2["sha256"]
    assert _request(stack, job)["status"] == "rejected"
    assert _version(stack, v1["id"])["status"] == "active"
    assert set(stack.record_states(stack.models[model], keys).values()) == {"present"}
    # The records can be requested again, and this time the result is released.
    job2 = _submit(stack, model, keys)
    assert run(stack, job2) == Outcome.SUCCEEDED
    assert [v["status"] for v in stack.versions(model)] == ["superseded", "rejected", "active"]
    assert stack.versions(model)[-1]["parent_id"] == v1["id"]


def test_stale_candidate_cannot_be_promoted(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    held = _submit(stack, model, trained.train_ids[:5], {"require_review": True})
    assert run(stack, held) == Outcome.SUCCEEDED
    # A later job starts from the active version 1 (which still holds the held records).
    later = _submit(stack, model, trained.train_ids[5:10])
    assert run(stack, later) == Outcome.SUCCEEDED
    v1, v2, v3 = stack.versions(model)
    assert (v2["status"], v3["status"], v3["parent_id"]) == ("candidate", "active", v1["id"])
    resp = post(stack, f"/v1/model-versions/{v2['id']}/promote")
    assert resp.status_code == 409 and resp.json()["type"].endswith("/candidate-stale")
    assert _version(stack, v3["id"])["status"] == "active"
    assert post(stack, f"/v1/model-versions/{v2['id']}/reject").status_code == 200


def test_thresholds_decide_and_are_recorded(stack: Stack, trained: Trained) -> None:
    model = stack.register(trained, "mlp")
    # A strict per-request policy: any drop in eval accuracy holds the result.
    job = _submit(
        stack,
        model,
        trained.train_ids[:8],
        {"max_eval_acc_drop": 0.0, "mode": "random"},
    )
    assert run(stack, job) == Outcome.SUCCEEDED
    version = stack.versions(model)[-1]
    policy = version["metrics"]["policy"]
    before, after = version["metrics"]["before"], version["metrics"]["after"]
    drop = next(c for c in policy["checks"] if c["name"] == "eval_acc_drop")
    assert drop["value"] == pytest.approx(before["eval_acc"] - after["eval_acc"], abs=1e-6)
    assert drop["limit"] == 0.0 and drop["ok"] == (drop["value"] <= 0.0)
    # The membership check restates the after-metrics' evidence; its outcome decides.
    member = next(c for c in policy["checks"] if c["name"] == "membership")
    assert member["evidence"]["n"] == 8 and member["value"] == after["membership"]["statistic"]
    assert member["ok"] == after["membership"]["releases"]
    assert "mia_confidence" in after and "mia_efficacy" in after
    expected = "active" if drop["ok"] and member["ok"] else "candidate"
    assert version["status"] == policy["decision"] == expected
    assert policy["thresholds"]["max_eval_acc_drop"] == 0.0


def test_class_wise_forget_set_is_judged_by_forget_accuracy(stack: Stack, trained: Trained) -> None:
    import io

    import numpy as np

    model = stack.register(trained, "mlp")
    with np.load(io.BytesIO(trained.train_npz), allow_pickle=False) as f:
        ids, labels = [str(i) for i in f["ids"]], f["labels"]
    class_keys = [k for k, label in zip(ids, labels, strict=True) if label == 7]
    job = _submit(stack, model, class_keys, {"max_forget_acc": 1.0, "max_eval_acc_drop": 1.0})
    assert run(stack, job) == Outcome.SUCCEEDED
    metrics = stack.versions(model)[-1]["metrics"]
    policy = metrics["policy"]
    assert policy["class_wise"] is True and policy["mode"] == "class"
    assert [c["name"] for c in policy["checks"]] == ["eval_acc_drop", "forget_acc", "membership"]
    # Same-class non-members are the class-wise comparison.
    assert "same-class" in policy["checks"][2]["evidence"]["test"]
    assert policy["checks"][1]["ok"] is True
    assert policy["decision"] == ("active" if policy["failed"] == [] else "candidate")
    # Utility is judged on the classes that remain, measured before and after.
    drop = policy["checks"][0]
    assert drop["metric"] == "eval_acc_retained_classes"
    before, after = metrics["before"], metrics["after"]
    assert drop["value"] == pytest.approx(
        before["eval_acc_retained_classes"] - after["eval_acc_retained_classes"], abs=1e-6
    )


def test_class_wise_eval_drop_ignores_the_forgotten_class() -> None:
    from service.trust.policy import decide

    policy = {
        "max_eval_acc_drop": 0.05,
        "max_forget_acc": 0.2,
        "max_forget_auc_excess": 0.0,
        "mode": "auto",
        "require_review": False,
    }
    # Losing the forgotten class costs 9 points overall but only 1 on the other classes.
    before = {"eval_acc": 0.98, "eval_acc_retained_classes": 0.98, "forget_acc": 1.0}
    after = {"eval_acc": 0.89, "eval_acc_retained_classes": 0.97, "forget_acc": 0.05}
    after["membership"] = {"outcome": "forgotten", "releases": True, "statistic": 0.3}
    assert decide(policy, before, after, class_wise=True)["decision"] == "active"
    # The same numbers for a random forget set are judged on all of eval.
    unseen = {"membership": {"outcome": "forgotten", "releases": True, "statistic": 0.1}}
    random = decide(policy, before, {**after, **unseen}, class_wise=False)
    assert random["decision"] == "candidate" and random["failed"] == ["eval_acc_drop"]
    assert random["checks"][0]["metric"] == "eval_acc"


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"max_eval_acc_drop": 1.5}, "params.policy.max_eval_acc_drop"),
        ({"max_forget_acc": -0.1}, "params.policy.max_forget_acc"),
        ({"max_forget_auc_excess": "high"}, "params.policy.max_forget_auc_excess"),
        ({"mode": "sometimes"}, "params.policy.mode"),
        ({"require_review": "yes"}, "params.policy.require_review"),
        ({"max_recall": 0.1}, "params.policy.max_recall"),
        ("strict", "params.policy"),
    ],
)
def test_policy_overrides_are_validated_at_submission(
    sqlite_stack: Stack, trained: Trained, policy: object, field: str
) -> None:
    stack = sqlite_stack
    model = stack.register(trained, "mlp")
    resp = post(
        stack,
        "/v1/deletion-requests",
        json={
            "model": model,
            "dataset": stack.models[model],
            "record_keys": trained.train_ids[:3],
            "params": {"policy": policy},
        },
    )
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in resp.json()["errors"]] == [field]
    assert stack.client.get("/v1/jobs", headers=stack.headers).json()["items"] == []


def _key(stack: Stack, scope: str) -> str:
    from service.api.auth import create_key
    from service.storage.db import transaction

    with transaction(stack.sessions) as session:
        _, secret = create_key(session, scope=scope)
    return secret


def test_no_utility_evidence_is_never_activated() -> None:
    from service.trust.policy import decide

    policy = {
        "max_eval_acc_drop": 1.0,
        "max_forget_acc": 1.0,
        "max_forget_auc_excess": 1.0,
        "mode": "auto",
        "require_review": False,
    }
    # No eval dataset: neither the drop nor the indistinguishability test can run.
    result = decide(policy, {"forget_acc": 1.0}, {"forget_acc": 0.0}, class_wise=False)
    assert result["decision"] == "candidate"
    assert result["failed"] == ["eval_acc_drop", "membership"]
    assert all("not measured" in r for r in result["reasons"])
    assert result["reason"] == "membership-not-measured"
    # Class-wise with forgetting measured but utility not: still held.
    evidence = {"membership": {"outcome": "forgotten", "releases": True, "statistic": 0.0}}
    held = decide(policy, {"forget_acc": 1.0}, {"forget_acc": 0.0, **evidence}, class_wise=True)
    assert held["decision"] == "candidate" and held["failed"] == ["eval_acc_drop"]
    assert held["reasons"] == ["eval_acc_drop: not measured (no eval dataset)"]


def test_membership_outcomes_hold_with_a_named_reason() -> None:
    from service.trust.policy import decide

    policy = {"max_eval_acc_drop": 0.05, "mode": "auto", "require_review": False}
    before = {"eval_acc": 0.9}
    for outcome, stopped, reason in [
        ("remembered", "guard-exhausted", "not-forgotten-within-guard"),
        ("insufficient-evidence", "budget-exhausted", "not-forgotten-within-guard"),
        ("insufficient-evidence", "target-at-start", "insufficient-evidence"),
        ("over-forgotten", "overshoot-exhausted", "over-forgotten"),
    ]:
        ev = {"outcome": outcome, "releases": False, "statistic": 2.5, "limit": -1.0}
        got = decide(
            policy, before, {"eval_acc": 0.9, "membership": ev}, class_wise=False, stopped=stopped
        )
        assert got["decision"] == "candidate" and got["failed"] == ["membership"]
        assert got["reason"] == reason and reason in got["reasons"][0]
    ok = {"outcome": "no-membership-signal", "releases": True, "statistic": 0.2}
    got = decide(policy, before, {"eval_acc": 0.9, "membership": ok}, class_wise=False)
    assert got["decision"] == "active" and got["reason"] is None
