"""One shape per resource (issue 24 item 4): every JSON answer is validated by its route's Out
model, the OpenAPI document declares the whole answer, and one `Problem` document describes
every error."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute
from pydantic import ValidationError

from service.api import schemas
from service.api.rendering import render
from service.errors import Problem, problem_dict
from tests.service.conftest import Api

# Routes that answer with something other than a JSON resource (files, HTML, Prometheus text).
NOT_JSON = {"download_checkpoint", "download_model_file", "console", "metrics"}


def _reachable(schema: dict[str, Any], components: dict[str, Any], seen: set[str]) -> None:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                _reachable(components[name], components, seen)
        for value in schema.values():
            _reachable(value, components, seen)
    elif isinstance(schema, list):
        for value in schema:
            _reachable(value, components, seen)


def test_every_json_route_answers_through_its_out_model(api: Api) -> None:
    routes = [r for r in api.client.app.routes if isinstance(r, APIRoute)]
    undeclared = [r.name for r in routes if r.response_model is None and r.name not in NOT_JSON]
    assert not undeclared, undeclared


def test_the_document_declares_whole_answers(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    components = doc["components"]["schemas"]
    answered: set[str] = set()
    for path in doc["paths"].values():
        for operation in path.values():
            for response in operation.get("responses", {}).values():
                _reachable(response.get("content", {}), components, answered)
    # Every object a response can contain says it has nothing beyond its properties.
    open_objects = [
        name
        for name in answered
        if components[name].get("type") == "object"
        and components[name].get("additionalProperties") is not False
    ]
    assert not open_objects, open_objects
    assert {"JobOut", "DeletionRequestOut", "ReceiptPayload", "Problem", "ModelOut"} <= answered
    # Fields the views always produced now appear in the document.
    assert {"timings", "submitted_seq", "params"} <= set(components["JobOut"]["properties"])
    assert {"content_sha256", "size_bytes", "meta"} <= set(components["DatasetOut"]["properties"])
    assert {"eval_dataset_id", "created_at"} <= set(components["ModelOut"]["properties"])
    assert {"row", "purged_at"} <= set(components["RecordOut"]["properties"])


def test_a_view_with_an_undeclared_field_is_refused_not_sent() -> None:
    view = {"id": "r1", "status": "queued", "job": {"id": "j1", "status": "queued"}}
    assert render(schemas.SubmissionOut, view, status_code=202).status_code == 202
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        render(schemas.SubmissionOut, view | {"internal": 1})
    with pytest.raises(ValidationError):
        schemas.JobRef.model_validate({"id": "j1", "status": "queued", "kind": "imu"})


def test_stored_documents_keep_their_declared_fields_only() -> None:
    # A decision written by another version of the worker: an unknown key is not answered.
    stored = {"decision": "candidate", "reason": "remembered", "written_by_v9": True}
    decision = schemas.PolicyDecision.model_validate(stored)
    assert decision.reason == "remembered"
    assert "written_by_v9" not in decision.model_dump()
    assert schemas.PolicyDecision.model_json_schema()["additionalProperties"] is False


def test_one_problem_document_for_the_api_and_failed_jobs(api: Api) -> None:
    assert not hasattr(schemas, "Problem")  # the schema module reuses service.errors.Problem
    doc = api.client.get("/openapi.json").json()
    assert doc["components"]["schemas"]["Problem"] == {
        **Problem.model_json_schema(ref_template="#/components/schemas/{model}"),
    }
    body = problem_dict("conflict", None, 409, "taken", job_status="running")
    assert body == {
        "type": "https://lethe.dev/problems/conflict",
        "title": "Conflict",
        "status": 409,
        "detail": "taken",
        "job_status": "running",
    }
    assert problem_dict("gone", None, 410, "x", retired_at=None)["retired_at"] is None
    with pytest.raises(ValidationError):
        problem_dict("conflict", None, 409, "x", undeclared_member=1)
    # A real error answer is exactly such a document.
    missing = api.client.get("/v1/jobs/nope", headers=api.h("read"))
    assert missing.status_code == 404
    Problem.model_validate(missing.json())
