"""The OpenAPI document as a contract: `openapi-python-client` generates a client from the
app's document (offline, no warnings), and that client drives the main flow against a real
`lethe serve`: list models, submit a deletion request, poll it, download the checkpoint."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from service.api.app import create_app
from service.cli.api_client import LetheClient
from service.settings import Settings

from .conftest import Server

pytestmark = pytest.mark.slow
PACKAGE = "lethe_generated_client"


def _document(home: Path) -> dict[str, Any]:
    return create_app(Settings(home=home)).openapi()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, str]]:
    work = tmp_path_factory.mktemp("generated")
    spec = work / "openapi.json"
    spec.write_text(json.dumps(_document(work / "home")))
    bin_dir = str(Path(sys.executable).parent)  # its ruff post-hook runs from the venv
    run = subprocess.run(
        [
            str(Path(bin_dir) / "openapi-python-client"),
            "generate",
            "--path",
            str(spec),
            "--meta",
            "none",
            "--output-path",
            str(work / PACKAGE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module(PACKAGE), output
    finally:
        sys.path.remove(str(work))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_generation_has_no_warnings(generated: tuple[ModuleType, str]) -> None:
    _, output = generated
    assert "Warning" not in output and "warning" not in output, output
    assert "Generating" in output


def test_document_names_its_problems_and_operations(tmp_path: Path) -> None:
    doc = _document(tmp_path)
    problem = {"$ref": "#/components/schemas/Problem"}
    ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ids.append(op["operationId"])
            assert "_v1_" not in op["operationId"], (method, path)
            for code, response in op["responses"].items():
                if int(code) >= 400:
                    content = response["content"]
                    assert content == {"application/problem+json": {"schema": problem}}, (
                        method,
                        path,
                        code,
                    )
            if path.startswith("/v1/"):
                assert {"401", "403", "503"} <= set(op["responses"]), (method, path)
            if "{" in path:
                assert "404" in op["responses"], (method, path)
    assert len(ids) == len(set(ids))
    assert "models-download-checkpoint" in ids and "deletion-requests-list" in ids
    checkpoint = doc["paths"]["/v1/model-versions/{version_id}/checkpoint"]["get"]
    assert {"404", "410", "416"} <= set(checkpoint["responses"])
    schemas = doc["components"]["schemas"]
    # Typed params: bounds from the engine's config, documented in the schema.
    top_data = schemas["IMUParams"]["properties"]["top_data"]["anyOf"][0]
    assert top_data["exclusiveMinimum"] == 0.0 and top_data["maximum"] == 1.0
    assert "train_mode" in schemas["GAParams"]["properties"]
    assert "train_mode" not in schemas["IMUParams"]["properties"]
    assert set(schemas["RequestStatus"]["enum"]) >= {"needs_review", "completed", "rejected"}
    receipt = doc["paths"]["/v1/deletion-requests/{request_id}/receipt"]["get"]
    assert receipt["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ReceiptOut"
    }


def test_main_flow_through_the_generated_client(
    generated: tuple[ModuleType, str], server: Server, digits_npz: Path, mlp_weights: Path
) -> None:
    package, _ = generated
    models = importlib.import_module(f"{PACKAGE}.models")

    def operation(tag: str, op: str) -> Any:
        return importlib.import_module(f"{PACKAGE}.api.{tag}.{op}")

    models_list = operation("models", "models_list")
    download_checkpoint = operation("models", "models_download_checkpoint")
    submit = operation("deletion_requests", "deletion_requests_submit")
    show_request = operation("deletion_requests", "deletion_requests_show")

    # Registration (admin set-up) through the project's own client; the rest is generated.
    name = f"gen-{uuid.uuid4().hex[:6]}"
    with LetheClient(server.url, server.admin_key) as lethe:
        ds = lethe.upload_dataset(digits_npz, name="digits-gen", kind="tensor", role="train")
        spec = {
            "name": name,
            "architecture": "mlp",
            "arch_kwargs": {"in_features": 64, "hidden": [32], "num_classes": 10},
        }
        lethe.register_model(spec, mlp_weights)

    client = package.AuthenticatedClient(base_url=server.url, token=server.admin_key)
    listing = models_list.sync(client=client, limit=1000)
    assert isinstance(listing, models.PageModelOut)
    assert name in {m.name for m in listing.items}

    params = models.IMUParams(epochs=1, calibration=models.IMUParamsCalibrationType0.OFF)
    body = models.DeletionRequestIn(
        model=name, dataset=ds["id"], record_keys=["d0390", "d0391"], params=params
    )
    submitted = submit.sync_detailed(
        client=client, body=body, idempotency_key=f"gen-{uuid.uuid4().hex}"
    )
    assert submitted.status_code == 202, submitted.content
    accepted = submitted.parsed
    assert isinstance(accepted, models.SubmissionOut)
    assert accepted.status == models.RequestStatus.QUEUED

    bad = models.DeletionRequestIn(model=name, dataset=ds["id"], record_keys=["no-such-key"])
    refused = submit.sync(client=client, body=bad)
    assert isinstance(refused, models.Problem) and refused.status == 422

    deadline = time.monotonic() + 120
    while True:
        request = show_request.sync(client=client, request_id=accepted.id)
        assert isinstance(request, models.DeletionRequestOut)
        if request.status not in (models.RequestStatus.QUEUED, models.RequestStatus.RUNNING):
            break
        assert time.monotonic() < deadline, request.status
        time.sleep(0.3)
    # No eval dataset: the release policy holds the result for review, and says why.
    assert request.status == models.RequestStatus.NEEDS_REVIEW
    assert isinstance(request.result_version, models.VersionRef)
    assert request.result_version.status == models.VersionStatus.CANDIDATE
    assert isinstance(request.policy, models.PolicyDecision)
    assert "eval_acc_drop" in request.policy.failed

    download = download_checkpoint.sync_detailed(
        client=client, version_id=request.result_version.id
    )
    assert download.status_code == 200
    assert download.headers["etag"].strip('"') == hashlib.sha256(download.content).hexdigest()
    missing = download_checkpoint.sync(client=client, version_id="nope")
    assert isinstance(missing, models.Problem) and missing.status == 404
