"""Erasure receipts: a JWS (EdDSA) issued for completed requests only; verifiable by anyone
with the JWKS and any JOSE library (here jwcrypto, which Lethe does not use); any
modification, another key, or an algorithm swap fails verification."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from pathlib import Path

import pytest
from jwcrypto import jwk as jc_jwk
from jwcrypto import jws as jc_jws
from typer.testing import CliRunner

from service.cli import app
from service.trust.receipts import ReceiptError, verify
from service.trust.signing import KEY_FILE, OKPKey
from tests.trust.conftest import get, request_id_of, run
from tests.worker.harness import Stack, Trained
from worker.context import Outcome

cli = CliRunner()


def _completed(stack: Stack, trained: Trained, keys: list[str]) -> tuple[str, str, str]:
    model = stack.register(trained, "mlp")
    job = stack.submit(model, keys)
    assert run(stack, job) == Outcome.SUCCEEDED
    return model, job, request_id_of(stack, job)


def _verify_cli(path: Path, jwks: Path):
    return cli.invoke(app, ["receipt", "verify", str(path), "--jwks", str(jwks)])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwks(stack: Stack, tmp_path: Path) -> tuple[dict, Path]:
    resp = stack.client.get("/.well-known/jwks.json")  # no Authorization header
    assert resp.status_code == 200, resp.text
    path = tmp_path / "jwks.json"
    path.write_text(resp.text)
    return resp.json(), path


def test_receipt_content_and_verification_by_another_jose_library(
    stack: Stack, trained: Trained, tmp_path: Path
) -> None:
    keys = trained.train_ids[:6]
    model, job_id, request_id = _completed(stack, trained, keys)
    resp = get(stack, f"/v1/deletion-requests/{request_id}/receipt")
    assert resp.status_code == 200, resp.text
    token = resp.json()["jws"]
    jwks, jwks_path = _jwks(stack, tmp_path)
    assert [k["kty"] for k in jwks["keys"]] == ["OKP"] and "d" not in jwks["keys"][0]

    # An outside verifier: jwcrypto, the public JWKS, no Lethe code.
    outside = jc_jws.JWS()
    outside.deserialize(token)
    header = outside.jose_header
    assert header["alg"] == "EdDSA" and header["kid"] == jwks["keys"][0]["kid"]
    outside.verify(jc_jwk.JWKSet.from_json(json.dumps(jwks)).get_key(header["kid"]))
    receipt = json.loads(outside.payload)
    assert receipt == resp.json()["payload"]

    job = stack.job(job_id)
    v1, v2 = stack.versions(model)
    assert receipt["request"]["id"] == request_id and receipt["request"]["model"] == model
    assert receipt["records"]["count"] == 6
    assert receipt["records"]["key_sha256"] == [
        hashlib.sha256(k.encode()).hexdigest() for k in keys
    ]
    assert receipt["source_version"]["sha256"] == v1["sha256"]
    assert receipt["result_version"] == {"id": v2["id"], "number": 2, "sha256": v2["sha256"]}
    assert receipt["metrics"]["after"] == job["metrics"]["after"]
    assert not any(k in resp.text for k in keys)  # only hashes of keys
    events = get(stack, "/v1/audit", limit=200).json()["items"]
    accepted = next(
        e for e in events if e["action"] == "request.accepted" and e["subject_id"] == request_id
    )
    audit = receipt["audit"]
    assert audit["first_seq"] == accepted["seq"]
    # The embedded checkpoint is itself a JWS over the chain head, stored in object storage.
    checkpoint = jc_jws.JWS()
    checkpoint.deserialize(audit["checkpoint"]["jws"])
    checkpoint.verify(jc_jwk.JWKSet.from_json(json.dumps(jwks)).get_key(header["kid"]))
    signed = json.loads(checkpoint.payload)
    assert signed["seq"] >= audit["last_seq"] and signed["seq"] == audit["checkpoint"]["seq"]
    chain = get(stack, "/v1/audit/verify").json()
    assert chain["ok"] and chain["checkpoints"] >= 1
    assert chain["latest_checkpoint"]["seq"] >= signed["seq"]

    path = tmp_path / "receipt.json"
    path.write_text(resp.text)
    ok = _verify_cli(path, jwks_path)
    assert ok.exit_code == 0, ok.stderr
    assert request_id in ok.stdout and "OK" in ok.stdout
    bare = tmp_path / "receipt.jws"
    bare.write_text(token)
    assert _verify_cli(bare, jwks_path).exit_code == 0

    # Modified payload (same signature), another key, an HMAC "signature" made with the
    # public key as secret (algorithm confusion), the unsigned copy: all refused.
    h, p, sig = token.split(".")
    doctored = dict(receipt, records={**receipt["records"], "count": 7})
    forged_payload = _b64(json.dumps(doctored).encode())
    hs_header = _b64(json.dumps({"alg": "HS256", "kid": header["kid"]}).encode())
    x = jwks["keys"][0]["x"].encode()
    hs_sig = _b64(hmac.new(x, f"{hs_header}.{p}".encode(), hashlib.sha256).digest())
    other = {"keys": [{**OKPKey.generate_key("Ed25519").as_dict(private=False), "kid": "k2"}]}
    cases = [
        (f"{h}.{forged_payload}.{sig}", jwks, "does not verify"),
        (token, other, "does not hold"),
        (f"{hs_header}.{p}.{hs_sig}", jwks, "unsupported algorithm"),
        (json.dumps(resp.json()["payload"]), jwks, "compact JWS"),
    ]
    for forged, keyset, words in cases:
        with pytest.raises(ReceiptError, match=words):
            verify(json.loads(forged) if forged.startswith("{") else forged, keyset)
        bad = tmp_path / "forged.json"
        bad.write_text(forged)
        keyfile = tmp_path / "keys.json"
        keyfile.write_text(json.dumps(keyset))
        out = _verify_cli(bad, keyfile)
        assert out.exit_code == 1 and "INVALID" in out.stderr, out.stderr
    with pytest.raises(jc_jws.InvalidJWSSignature):
        outside = jc_jws.JWS()
        outside.deserialize(f"{h}.{forged_payload}.{sig}")
        outside.verify(jc_jwk.JWKSet.from_json(json.dumps(jwks)).get_key(header["kid"]))
    assert _verify_cli(path, tmp_path / "missing.json").exit_code == 2


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


def test_installation_key_created_once_0600_and_rotation_keeps_old_receipts_valid(
    sqlite_stack: Stack, trained: Trained, tmp_path: Path
) -> None:
    stack = sqlite_stack
    assert stack.settings.signing_key == ""
    key_path = Path(stack.settings.home) / KEY_FILE
    assert not key_path.exists()
    _, _, rid = _completed(stack, trained, trained.train_ids[:4])
    first = get(stack, f"/v1/deletion-requests/{rid}/receipt").json()
    assert key_path.exists() and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    second = get(stack, f"/v1/deletion-requests/{rid}/receipt").json()
    assert first["kid"] == second["kid"]
    old_jwks, old_path = _jwks(stack, tmp_path)
    # Rotate: a new LETHE_SIGNING_KEY, the old key listed as retired. The JWKS then holds
    # both; the old receipt still verifies against the new JWKS, and new ones use the new kid.
    from service.settings import load_settings

    new_key = tmp_path / "new-key.pem"
    new_key.write_bytes(OKPKey.generate_key("Ed25519").as_pem(private=True))
    rotated = load_settings(
        **{
            **stack.settings.model_dump(),
            "signing_key": str(new_key),
            "retired_signing_keys": str(key_path),
        }
    )
    from service.trust.signing import load_signer

    signer = load_signer(rotated)
    assert signer.kid != first["kid"]
    assert {k["kid"] for k in signer.jwks()["keys"]} == {signer.kid, first["kid"]}
    assert verify(first, signer.jwks())["key_id"] == first["kid"]
    # Without the retired key, the old receipt no longer verifies.
    with pytest.raises(ReceiptError, match="does not hold"):
        verify(first, load_signer(rotated.model_copy(update={"retired_signing_keys": ""})).jwks())
    assert old_jwks["keys"][0]["kid"] == first["kid"] and old_path.exists()
