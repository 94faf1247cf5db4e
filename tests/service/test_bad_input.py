"""Hostile and broken input: each is a clear 4xx problem and leaves nothing stored."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.storage.objects import Storage
from tests.service.conftest import MLP_KWARGS, Api, digits_npz, mlp_weights, npz_bytes

PROBLEM = "application/problem+json"


class Canary:
    """Unpickling this would create the canary file: proof that nothing was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _nothing_stored(api: Api, storage_dir: Path) -> None:
    assert list(Storage(str(storage_dir)).iter_keys()) == []
    for path in ("/v1/datasets", "/v1/models"):
        assert api.client.get(path, headers=api.h("read")).json()["items"] == []


def _problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["type"].startswith("https://lethe.dev/problems/")
    assert body["title"] and body["detail"] and "Traceback" not in r.text
    return body


def test_pickled_checkpoint_is_refused_never_unpickled(
    api: Api, storage_dir: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "canary-unpickled"
    buf = io.BytesIO()
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "x": Canary(canary)}, buf)
    assert not canary.exists()
    for payload in (buf.getvalue(), b"PK\x03\x04not a zip", b"garbage", b""):
        r = api.register_model(
            {"name": "evil", "architecture": "mlp", "arch_kwargs": MLP_KWARGS},
            payload,
            filename="model.pt",
        )
        body = _problem(r, 422)
        assert body["type"].endswith("/invalid-checkpoint") and "safetensors" in body["detail"]
    assert not canary.exists()
    _nothing_stored(api, storage_dir)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"ids": np.array([{"a": 1}] * 3, dtype=object)}, "object arrays"),
        ({"inputs": np.array([[1], "x", None], dtype=object)}, "object arrays"),
        ({"ids": np.array(["a", "b", "a"])}, "duplicate ids: 'a'"),
        ({"inputs": np.array([[0.0, np.nan]] * 3)}, "NaN"),
        ({"inputs": np.zeros((2, 2))}, "length mismatch"),
        ({"labels": np.zeros((3, 2), dtype=int)}, "one-dimensional"),
        ({"labels": np.array([0.5, 1.0, 2.0])}, "integers"),
    ],
)
def test_bad_npz(api: Api, storage_dir: Path, arrays: dict, needle: str) -> None:
    good = {"ids": np.array(["a", "b", "c"]), "inputs": np.zeros((3, 2)), "labels": np.arange(3)}
    r = api.upload_dataset(npz_bytes(**(good | arrays)))
    body = _problem(r, 422)
    assert body["type"].endswith("/invalid-dataset") and needle in body["detail"]
    assert body["errors"]
    _nothing_stored(api, storage_dir)


def test_not_an_npz(api: Api, storage_dir: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary-npz"
    import pickle

    for content in (pickle.dumps(Canary(canary)), b"hello", b""):
        _problem(api.upload_dataset(content), 422)
    assert not canary.exists()
    _nothing_stored(api, storage_dir)


def test_oversize_upload(settings, api_keys, storage_dir: Path, digits) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import load_settings

    small = load_settings(
        database_url=settings.database_url, storage_url=str(storage_dir), max_upload_mb=1
    )
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        api = Api(client, api_keys)
        big = npz_bytes(
            ids=np.arange(3000).astype(str),
            inputs=np.zeros((3000, 200)),
            labels=np.zeros(3000, dtype=int),
        )
        assert len(big) > 2 * 1024 * 1024  # past limit + form overhead: refused by length
        body = _problem(api.upload_dataset(big), 413)
        assert body["type"].endswith("/payload-too-large")
        medium = npz_bytes(
            ids=np.arange(1000).astype(str),
            inputs=np.zeros((1000, 160)),
            labels=np.zeros(1000, dtype=int),
        )
        assert 1024 * 1024 < len(medium) < 2 * 1024 * 1024  # refused while streamed to storage
        _problem(api.upload_dataset(medium), 413)

        def chunks():  # no Content-Length: counted as it arrives
            boundary = b"--xyz"
            yield boundary + b"\r\n"
            yield b'Content-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
            for _ in range(40):
                yield b"\0" * 65536
            yield b"\r\n" + boundary + b"--\r\n"

        r = client.post(
            "/v1/datasets",
            content=chunks(),
            headers=api.h("admin", **{"Content-Type": "multipart/form-data; boundary=xyz"}),
        )
        _problem(r, 413)
        _nothing_stored(api, storage_dir)
        assert api.upload_dataset(digits_npz(digits, 50)).status_code == 201


def test_path_like_names(api: Api, storage_dir: Path, tmp_path: Path, digits) -> None:
    for name in ("../../etc/passwd", "a/b", "..", "a\\b", "/abs", "", "x" * 201, "\x00x"):
        r = api.upload_dataset(digits_npz(digits, 10), name=name)
        assert r.status_code == 422, (name, r.text)
    for name in ("../m", "m/../n", "a b"):
        r = api.register_model(
            {"name": name, "architecture": "mlp", "arch_kwargs": MLP_KWARGS}, mlp_weights()
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "spec.name"
    _nothing_stored(api, storage_dir)
    # A hostile client file name never reaches a path: the server names the object.
    r = api.upload_dataset(digits_npz(digits, 10), filename="../../../escaped.npz")
    assert r.status_code == 201
    assert list(Storage(str(storage_dir)).iter_keys()) == [f"datasets/{r.json()['id']}.npz"]
    assert not list(tmp_path.rglob("escaped.npz"))


def test_unknown_fields(api: Api, storage_dir: Path, digits) -> None:
    r = api.client.post(
        "/v1/datasets",
        headers=api.h(),
        data={"name": "d", "kind": "tensor", "role": "train", "owner": "me"},
        files={"file": ("d.npz", digits_npz(digits, 10), "application/octet-stream")},
    )
    body = _problem(r, 422)
    assert body["errors"] == [{"field": "owner", "in": "body", "message": "unknown field"}]
    r = api.register_model(
        {"name": "m", "architecture": "mlp", "arch_kwargs": MLP_KWARGS, "surprise": 1},
        mlp_weights(),
    )
    assert _problem(r, 422)["errors"][0]["field"] == "spec.surprise"
    r = api.client.post(
        "/v1/models",
        headers=api.h(),
        data={"spec": "{not json"},
        files={"weights": ("w", mlp_weights(), "application/octet-stream")},
    )
    assert "spec is not valid JSON" in _problem(r, 422)["detail"]
    r = api.upload_dataset(digits_npz(digits, 10), kind="images")
    assert _problem(r, 422)["errors"][0]["field"] == "kind"
    _nothing_stored(api, storage_dir)
    r = api.client.post(
        "/v1/deletion-requests",
        headers=api.h("submit"),
        json={"model": "m", "dataset": "d", "record_keys": ["a"], "surprise": True},
    )
    assert [e["field"] for e in _problem(r, 422)["errors"]] == ["surprise"]
    r = api.client.post(
        "/v1/deletion-requests",
        headers=api.h("submit", **{"Content-Type": "application/json"}),
        content=b"{broken",
    )
    _problem(r, 422)


ROUTES = [
    ("post", "/v1/datasets", "admin"),
    ("post", "/v1/models", "admin"),
    ("post", "/v1/deletion-requests", "submit"),
    ("post", "/v1/jobs/some-id/cancel", "submit"),
    ("get", "/v1/datasets", "read"),
    ("get", "/v1/jobs", "read"),
    ("get", "/v1/audit/verify", "read"),
]


@pytest.mark.parametrize(("method", "path", "needed"), ROUTES)
def test_wrong_scopes(api: Api, method: str, path: str, needed: str) -> None:
    r = getattr(api.client, method)(path)
    assert _problem(r, 401)["type"].endswith("/unauthorized")
    lower = {"admin": "submit", "submit": "read", "read": None}[needed]
    if lower:
        r = getattr(api.client, method)(path, headers=api.h(lower))
        body = _problem(r, 403)
        assert body["required_scope"] == needed and needed in body["detail"]
    r = getattr(api.client, method)(path, headers=api.h(needed))
    assert r.status_code not in (401, 403)


def test_spec_field_errors_are_named(api: Api) -> None:
    r = api.register_model({"architecture": "mlp"}, mlp_weights())
    assert _problem(r, 422)["errors"][0]["field"] == "spec.name"
    r = api.register_model(
        {
            "name": "m",
            "architecture": "mlp",
            "arch_kwargs": MLP_KWARGS,
            "eval_dataset": "missing-ds",
        },
        mlp_weights(),
    )
    assert _problem(r, 422)["errors"][0]["field"] == "spec.eval_dataset"
    assert json.loads(json.dumps(r.json()))  # plain JSON, no internals
