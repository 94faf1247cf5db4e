"""Erasure receipts: issued for completed requests only, signed, verified offline by
`lethe receipt verify`; any modification, or the wrong key, fails verification."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.receipts import KEY_FILE, ReceiptError, key_id, verify
from tests.trust.conftest import get, request_id_of, run
from tests.worker.harness import Stack, Trained
from worker.runner import Outcome

KEY = "test-receipt-key-0123456789abcdef"
cli = CliRunner()


def _completed(stack: Stack, trained: Trained, keys: list[str]) -> tuple[str, str, str]:
    model = stack.register(trained, "mlp")
    job = stack.submit(model, keys)
    assert run(stack, job) == Outcome.SUCCEEDED
    return model, job, request_id_of(stack, job)


def _verify_cli(path: Path, *args: str, env: dict[str, str] | None = None):
    return cli.invoke(app, ["receipt", "verify", str(path), *args], env=env)


@pytest.mark.parametrize("stack", [{"receipt_hmac_key": KEY}], indirect=True)
def test_receipt_content_and_offline_verification(
    stack: Stack, trained: Trained, tmp_path: Path
) -> None:
    keys = trained.train_ids[:6]
    model, job_id, request_id = _completed(stack, trained, keys)
    resp = get(stack, f"/v1/deletion-requests/{request_id}/receipt")
    assert resp.status_code == 200, resp.text
    receipt = resp.json()
    job = stack.job(job_id)
    v1, v2 = stack.versions(model)
    assert receipt["request"]["id"] == request_id and receipt["request"]["model"] == model
    assert receipt["request"]["dataset_id"] == stack.models[model]
    assert receipt["records"]["count"] == 6
    assert receipt["records"]["key_sha256"] == [hashlib.sha256(k.encode()).hexdigest()
                                                for k in keys]  # fmt: skip
    assert receipt["records"]["purged_at"] and receipt["records"]["forgotten_at"]
    assert receipt["source_version"]["sha256"] == v1["sha256"]
    assert receipt["result_version"] == {"id": v2["id"], "number": 2, "sha256": v2["sha256"]}
    assert receipt["metrics"]["before"] == job["metrics"]["before"]
    assert receipt["metrics"]["after"] == job["metrics"]["after"]
    assert not any(k in resp.text for k in keys)  # only hashes of keys
    # The audit range spans the request's events, from acceptance to the purge.
    events = get(stack, "/v1/audit", limit=200).json()["items"]
    accepted = next(e for e in events if e["action"] == "request.accepted"
                    and e["subject_id"] == request_id)  # fmt: skip
    purged = next(e for e in events if e["action"] == "content.purged")
    audit = receipt["audit"]
    assert audit["first_seq"] == accepted["seq"] and audit["last_seq"] >= purged["seq"]
    head = get(stack, "/v1/audit/verify").json()
    assert audit["head_hash"] == head["head_hash"] and audit["head_seq"] == head["checked"]
    assert receipt["signature"]["alg"] == "HMAC-SHA256"
    assert receipt["signature"]["key_id"] == key_id(KEY.encode())
    assert verify(receipt, KEY.encode())["request_id"] == request_id

    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(receipt, indent=2))
    ok = _verify_cli(path, "--key-env", "RECEIPT_KEY", env={"RECEIPT_KEY": KEY})
    assert ok.exit_code == 0, ok.stderr
    assert request_id in ok.stdout and "OK" in ok.stdout
    assert _verify_cli(path, "--key", KEY).exit_code == 0

    # Any change breaks it: a metric, a key hash, the head, an added member.
    for mutate in (
        lambda r: r["metrics"]["after"].__setitem__(
            "forget_acc", r["metrics"]["after"]["forget_acc"] + 0.25),
        lambda r: r["records"]["key_sha256"].__setitem__(0, "0" * 64),
        lambda r: r["audit"].__setitem__("head_hash", "f" * 64),
        lambda r: r.__setitem__("note", "all good"),
    ):
        forged = json.loads(json.dumps(receipt))
        mutate(forged)
        bad = tmp_path / "forged.json"
        bad.write_text(json.dumps(forged))
        out = _verify_cli(bad, "--key", KEY)
        assert out.exit_code == 1 and "modified" in out.stderr, out.stderr
        with pytest.raises(ReceiptError):
            verify(forged, KEY.encode())
    wrong = _verify_cli(path, "--key", "another-key")
    assert wrong.exit_code == 1 and "wrong key" in wrong.stderr
    unsigned = {k: v for k, v in receipt.items() if k != "signature"}
    bad.write_text(json.dumps(unsigned))
    assert _verify_cli(bad, "--key", KEY).exit_code == 1
    bad.write_text("{not json")
    assert _verify_cli(bad, "--key", KEY).exit_code == 1


def test_receipt_only_for_completed_requests(sqlite_stack: Stack, trained: Trained) -> None:
    stack = sqlite_stack
    model = stack.register(trained, "mlp")
    job = stack.submit(model, trained.train_ids[:4])
    rid = request_id_of(stack, job)
    queued = get(stack, f"/v1/deletion-requests/{rid}/receipt")
    assert queued.status_code == 409
    assert queued.headers["content-type"].startswith("application/problem+json")
    assert queued.json()["type"].endswith("/request-not-completed")
    assert queued.json()["request_status"] == "queued"
    assert get(stack, "/v1/deletion-requests/nope/receipt").status_code == 404
    assert stack.cancel(job).status_code == 202
    assert get(stack, f"/v1/deletion-requests/{rid}/receipt").status_code == 409


def test_installation_key_is_created_once_with_0600(
    sqlite_stack: Stack, trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = sqlite_stack
    assert stack.settings.receipt_hmac_key == ""
    key_path = Path(stack.settings.home) / KEY_FILE
    assert not key_path.exists()
    _, _, rid = _completed(stack, trained, trained.train_ids[:4])
    first = get(stack, f"/v1/deletion-requests/{rid}/receipt").json()
    assert key_path.exists() and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    second = get(stack, f"/v1/deletion-requests/{rid}/receipt").json()
    assert first["signature"]["key_id"] == second["signature"]["key_id"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(second))
    # Offline, on the same installation: the key file under LETHE_HOME is found.
    monkeypatch.setenv("LETHE_HOME", str(stack.settings.home))
    assert _verify_cli(path).exit_code == 0
    assert _verify_cli(path, "--key-file", str(key_path)).exit_code == 0
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "elsewhere"))
    missing = _verify_cli(path)
    assert missing.exit_code == 2 and "no key" in missing.stderr
