"""Strings PostgreSQL cannot store (NUL, lone surrogates) are a 422 naming the field.

Runs on SQLite and on real PostgreSQL: on PostgreSQL these reached the driver and were a 500.
The path and query cases are generated from the OpenAPI document, so a new route is covered.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.service.conftest import MLP_KWARGS, Api, mlp_weights, npz_bytes

PROBLEM = "application/problem+json"


def _refused(r, field: str) -> dict:
    assert r.status_code == 422, (r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["type"].endswith("/validation-error")
    assert field in {e["field"] for e in body["errors"]}, body
    return body


def _string_params(api: Api) -> list[tuple[str, str, str, str]]:
    """(method, path template, param name, where) for every string path/query parameter."""
    out = []
    for path, ops in api.client.app.openapi()["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                if param["in"] not in ("path", "query"):
                    continue
                schema = json.dumps(param.get("schema", {}))
                if '"string"' in schema:
                    out.append((method, path, param["name"], param["in"]))
    return out


def test_every_string_path_and_query_parameter(api: Api) -> None:
    params = _string_params(api)
    assert len(params) >= 20  # the document really was walked
    for method, template, name, where in params:
        if where == "path":
            url = template.replace("{" + name + "}", "a%00b")
        else:
            url = template + f"?{name}=a%00b"
        url = re.sub(r"\{[^}]+\}", "x", url)
        r = api.client.request(method.upper(), url, headers=api.h("admin"))
        _refused(r, name)


def test_query_parameter_lone_surrogate_via_json_and_key(api: Api) -> None:
    r = api.client.get("/v1/audit?subject=ok&a%00=1", headers=api.h("read"))
    _refused(r, "a\x00")


@pytest.mark.parametrize(
    "field", ["model", "dataset", "record_keys.1", "reason", "subject_ref", "params.note"]
)
@pytest.mark.parametrize("bad", ["\\u0000", "\\ud800"])
def test_deletion_request_body(api: Api, field: str, bad: str) -> None:
    body = {
        "model": "m",
        "dataset": "d",
        "record_keys": ["k1", "k2"],
        "reason": "r",
        "subject_ref": "s",
        "params": {"note": "n"},
    }
    head, _, index = field.partition(".")
    if head == "record_keys":
        body["record_keys"][int(index)] = "MARK"
    elif head == "params":
        body["params"]["note"] = "MARK"
    else:
        body[head] = "MARK"
    raw = json.dumps(body).replace("MARK", f"x{bad}y")
    r = api.client.post(
        "/v1/deletion-requests",
        content=raw,
        headers=api.h("submit", **{"Content-Type": "application/json"}),
    )
    body = _refused(r, field)
    assert "U+" in body["errors"][0]["message"]


def test_model_spec_description_and_dataset_forms(api: Api, digits) -> None:
    spec = {
        "name": "m",
        "architecture": "mlp",
        "arch_kwargs": MLP_KWARGS,
        "description": "before\u0000after",
    }
    _refused(api.register_model(spec, mlp_weights()), "spec.description")
    # A raw NUL in a form field (the dataset name) and in the uploaded file's ids.
    _refused(api.upload_dataset(b"irrelevant", name="a\x00b"), "name")
    x, y = digits
    # numpy strips trailing NULs of fixed-width strings: the NUL must sit inside the key.
    ids = np.array([f"r{i}" for i in range(10)], dtype="<U8")
    ids[3] = "r\x00x3"
    r = api.upload_dataset(npz_bytes(ids=ids, inputs=x[:10], labels=y[:10]))
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "ids"
    # Nothing was stored, and the database still answers.
    assert api.client.get("/v1/datasets", headers=api.h("read")).json()["items"] == []
    assert api.client.get("/v1/models", headers=api.h("read")).json()["items"] == []
