"""Registering a causal LM and its JSONL texts over the API (TestClient, SQLite): the files
are checked without running code from them, stored, and served back byte for byte; every
bad input is a 422 problem naming the field, and nothing of a refused upload stays stored."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lm.lm_files import LMFiles, spec
from tests.worker.harness import Stack, api_stack, stack_settings

PROBLEM = "application/problem+json"


@pytest.fixture
def stack(lethe_env: Path, sqlite_url: str, storage_dir: Path) -> Iterator[Stack]:
    with api_stack(stack_settings(database_url=sqlite_url, storage_dir=storage_dir)) as s:
        yield s


def _register(stack: Stack, lm: LMFiles, name: str, files: Any = None, **spec_extra: Any):
    return stack.client.post(
        "/v1/models",
        headers=stack.headers,
        data={"spec": spec(name, **spec_extra)},
        files=files if files is not None else lm.form_files(),
    )


def _upload(stack: Stack, content: bytes, role: str = "train", name: str = "texts"):
    return stack.client.post(
        "/v1/datasets",
        headers=stack.headers,
        data={"name": name, "kind": "text", "role": role},
        files={"file": ("t.jsonl", content, "application/octet-stream")},
    )


def _stored(storage_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(storage_dir)) for p in storage_dir.rglob("*") if p.is_file())


def test_register_download_and_files(stack: Stack, lm: LMFiles) -> None:
    resp = _register(stack, lm, "profiles-lm")
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert model["architecture"] == "causal_lm"
    files = model["arch_kwargs"]["files"]
    assert files["config.json"]["sha256"] == hashlib.sha256(lm.config).hexdigest()
    v1 = model["active_version"]
    assert v1["sha256"] == hashlib.sha256(lm.weights).hexdigest()
    ckpt = stack.client.get(f"/v1/model-versions/{v1['id']}/checkpoint", headers=stack.headers)
    assert ckpt.status_code == 200 and ckpt.content == lm.weights
    assert ckpt.headers["etag"] == f'"{v1["sha256"]}"'
    part = stack.client.get(
        f"/v1/model-versions/{v1['id']}/checkpoint", headers={**stack.headers, "Range": "bytes=0-7"}
    )
    assert part.status_code == 206 and part.content == lm.weights[:8]
    for name, content in (
        ("config.json", lm.config),
        ("tokenizer.json", lm.tokenizer),
        ("tokenizer_config.json", lm.tokenizer_config),
    ):
        got = stack.client.get(f"/v1/model-versions/{v1['id']}/files/{name}", headers=stack.headers)
        assert got.status_code == 200 and got.content == content, name
        assert got.headers["etag"] == f'"{hashlib.sha256(content).hexdigest()}"'
    for bad in ("model.safetensors", "secrets.json", "..%2Fconfig.json"):
        miss = stack.client.get(f"/v1/model-versions/{v1['id']}/files/{bad}", headers=stack.headers)
        assert miss.status_code == 404, bad
        assert miss.headers["content-type"].startswith(PROBLEM)
    # The download needs a key like every read.
    assert stack.client.get(f"/v1/model-versions/{v1['id']}/files/config.json").status_code == 401


def _config(lm: LMFiles, **change: Any) -> bytes:
    return json.dumps({**json.loads(lm.config), **change}).encode()


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("unpickled!",))


@pytest.mark.parametrize(
    ("case", "field", "text"),
    [
        ("auto_map", "config", "remote code"),
        ("trust_remote_code", "config", "remote code"),
        ("model_type", "config", "model_type 'evil_lm' is not supported"),
        ("pickled_config", "config", "not valid JSON"),
        ("pickled_weights", "weights", "pickled checkpoints are refused"),
        ("pickled_tokenizer", "tokenizer", "not valid JSON"),
        ("tokenizer_remote", "tokenizer_config", "remote code"),
        ("missing_tokenizer", "tokenizer", "missing: tokenizer"),
        ("vocab_too_small", "config", "vocab_size is 16"),
        ("heads_zero", "config", "num_attention_heads must be an integer"),
        ("unknown_activation", "config", "cannot be built (KeyError"),
        ("empty_config", "config", "the file is empty"),
        ("huge_tokenizer_config", "tokenizer_config", "larger than 1048576 bytes"),
    ],
)
def test_bad_files_are_422(
    stack: Stack, lm: LMFiles, storage_dir: Path, case: str, field: str, text: str
) -> None:
    before = _stored(storage_dir)
    replace = {
        "auto_map": {"config": _config(lm, auto_map={"AutoModelForCausalLM": "evil.Model"})},
        "trust_remote_code": {"config": _config(lm, trust_remote_code=True)},
        "model_type": {"config": _config(lm, model_type="evil_lm")},
        "pickled_config": {"config": pickle.dumps(_Evil())},
        "pickled_weights": {"weights": pickle.dumps(_Evil())},
        "pickled_tokenizer": {"tokenizer": pickle.dumps(_Evil())},
        "tokenizer_remote": {"tokenizer_config": b'{"auto_map": {"AutoTokenizer": ["x.T"]}}'},
        "vocab_too_small": {"config": _config(lm, vocab_size=16)},
        "heads_zero": {"config": _config(lm, num_attention_heads=0)},
        "unknown_activation": {"config": _config(lm, hidden_act="evil")},
        "empty_config": {"config": b""},
        "huge_tokenizer_config": {"tokenizer_config": b" " * (1 << 20) + b"{}"},
    }.get(case, {})
    files = lm.form_files(**replace)
    if case == "missing_tokenizer":
        files.pop("tokenizer")
    resp = _register(stack, lm, f"bad-{case.replace('_', '-')}", files=files)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert text in body["detail"], body
    assert field in {e["field"] for e in body["errors"]}, body
    assert _stored(storage_dir) == before  # nothing half-stored
    listed = stack.client.get("/v1/models", headers=stack.headers).json()["items"]
    assert listed == []


def test_weights_not_matching_the_config_name_the_keys(stack: Stack, lm: LMFiles) -> None:
    # The config says 3 layers; the weights have 2.
    resp = _register(
        stack, lm, "mismatch", files=lm.form_files(config=_config(lm, num_hidden_layers=3))
    )
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["type"].endswith("/architecture-mismatch")
    assert "model.layers.2.mlp.up_proj.weight" in body["missing"]
    width = json.loads(lm.config)["hidden_size"]
    resp = _register(
        stack, lm, "mismatch2", files=lm.form_files(config=_config(lm, hidden_size=width * 2))
    )
    assert resp.status_code == 422
    assert any(m["key"] == "model.norm.weight" for m in resp.json()["mismatched"])


def test_lm_files_only_for_causal_lm_and_arch_kwargs_empty(stack: Stack, lm: LMFiles) -> None:
    mlp = json.dumps({"name": "m", "architecture": "mlp", "arch_kwargs": {"in_features": 4}})
    resp = stack.client.post(
        "/v1/models", headers=stack.headers, data={"spec": mlp}, files=lm.form_files()
    )
    assert resp.status_code == 422
    assert {e["field"] for e in resp.json()["errors"]} == {
        "config",
        "tokenizer",
        "tokenizer_config",
    }
    resp = _register(stack, lm, "kw", arch_kwargs={"hidden_size": 8})
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["field"] == "spec.arch_kwargs"


def test_jsonl_datasets(stack: Stack, lm: LMFiles) -> None:
    for role, content in (("train", lm.train), ("eval", lm.eval), ("member_probe", lm.probe)):
        resp = _upload(stack, content, role, name=f"profiles-{role}")
        assert resp.status_code == 201, resp.text
        ds = resp.json()
        assert ds["kind"] == "text" and ds["role"] == role
        assert ds["record_count"] == content.count(b"\n")
    keys = stack.client.get(f"/v1/datasets/{ds['id']}/records", headers=stack.headers).json()
    retain = [e.key for e in lm.fixture.examples["retain"]]
    assert [r["key"] for r in keys["items"]] == retain[: len(keys["items"])]
    bad = lm.eval.replace(b'"completion"', b'"completon"', 1)
    second = lm.eval.split(b"\n")
    bad2 = b"\n".join([second[0], b'{"id": "x", "prompt": 3, "completion": "c"}', *second[1:]])
    for content, line, field in ((bad, 1, "completon"), (bad2, 2, "prompt")):
        resp = _upload(stack, content, "eval", name="bad")
        assert resp.status_code == 422 and resp.headers["content-type"].startswith(PROBLEM)
        (error,) = resp.json()["errors"]
        assert (error["line"], error["field"]) == (line, field), error
        assert resp.json()["detail"].startswith(f"line {line}")


def test_eval_datasets_must_be_text(stack: Stack, lm: LMFiles) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.array(["a", "b"]),
        inputs=np.zeros((2, 3), np.float32),
        labels=np.zeros(2, np.int64),
    )
    tensor = stack.client.post(
        "/v1/datasets",
        headers=stack.headers,
        data={"name": "t", "kind": "tensor", "role": "eval"},
        files={"file": ("t.npz", buf.getvalue(), "application/octet-stream")},
    ).json()["id"]
    resp = _register(stack, lm, "wrong-kind", eval_dataset=tensor)
    assert resp.status_code == 422
    assert resp.json()["errors"] == [{"field": "spec.eval_dataset", "message": "kind must be text"}]
