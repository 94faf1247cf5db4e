"""The review workflow on the command line: deletion requests, promote/reject, receipts.

lethe requests list [--status needs_review] [--model M] [--subject-ref S]
lethe requests show REQUEST_ID
lethe versions promote VERSION_ID        # candidate -> active (admin)
lethe versions reject VERSION_ID         # candidate -> rejected (admin)
lethe receipt get REQUEST_ID -o receipt.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.api_client import DEFAULT_URL
from service.cli.client_commands import JsonOpt, KeyOpt, UrlOpt, _api, answer
from service.cli.common import command_group
from service.cli.jobs import print_request_outcome
from service.cli.render import (
    forgetting_lines,
    kv,
    metrics_table,
    out,
    policy_table,
    print_json,
    table,
)
from service.domain.states import RequestStatus

REQUEST_COLUMNS = ["id", "status", "model", "records", "result", "subject_ref", "created_at"]


def _row(request: dict[str, Any]) -> dict[str, Any]:
    version = request.get("result_version") or {}
    result = f"v{version.get('number')} {version.get('status')}" if version else None
    return {**request, "records": len(request.get("record_keys") or []), "result": result}


def show_request(request: dict[str, Any]) -> None:
    """Scalars, the job in one line, metrics and the policy decision as small tables."""
    job = request.get("job") or {}
    version = request.get("result_version") or {}
    fields = {
        "id": request.get("id"),
        "status": request.get("status"),
        "model": request.get("model"),
        "dataset": request.get("dataset"),
        "records": len(request.get("record_keys") or []),
        "method": request.get("method"),
        "params": json.dumps(request.get("params") or {}),
        "subject_ref": request.get("subject_ref"),
        "reason": request.get("reason"),
        "created_at": request.get("created_at"),
        "job": f"{job.get('id')} ({job.get('status')})" if job else None,
        "result_version": (
            f"{version.get('id')} (v{version.get('number')}, {version.get('status')})"
            if version
            else None
        ),
        "finished_at": job.get("finished_at"),
    }
    kv(fields, f"deletion request {request.get('id')}")
    metrics_table(job.get("metrics"))
    forgetting_lines(request)
    policy_table(request.get("policy"))


def register(app: typer.Typer) -> None:
    requests = command_group(app, "requests", "List and inspect deletion requests.")
    versions = command_group(app, "versions", "Inspect and download model versions.")
    receipt = command_group(app, "receipt", "Erasure receipts.")

    @requests.command("list")
    def list_(
        status: Annotated[
            RequestStatus | None, typer.Option(help="Only requests in this status.")
        ] = None,
        model: Annotated[str | None, typer.Option(help="Only requests for this model.")] = None,
        subject_ref: Annotated[
            str | None, typer.Option(help="Only requests with this subject reference.")
        ] = None,
        limit: Annotated[int, typer.Option(help="At most this many requests.", min=1)] = 100,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """List deletion requests, newest first, with their review state."""
        with _api(url, api_key) as api:
            items: list[dict[str, Any]] = []
            for item in api.iter_requests(status=status, model=model, subject_ref=subject_ref):
                items.append(item)
                if len(items) >= limit:
                    break
        if as_json:
            print_json(items)
        else:
            table([_row(r) for r in items], REQUEST_COLUMNS, "deletion requests")

    @requests.command("show")
    def show(
        request_id: Annotated[str, typer.Argument(help="Deletion request id.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Show a request: its state, job, result version, metrics and policy decision."""
        answer(
            url, api_key, as_json, lambda api: api.get_deletion_request(request_id), show_request
        )

    def _decide(version_id: str, action: str, url: str, api_key: str, as_json: bool) -> None:
        with _api(url, api_key) as api:
            version = (
                api.promote_version(version_id)
                if action == "promote"
                else api.reject_version(version_id)
            )
            job_id = version.get("job_id")
            job = api.get_job(str(job_id)) if job_id else {}
            request = api.get_deletion_request(str(job["request_id"])) if job else None
        if as_json:
            print_json({"version": version, "request": request})
            return
        out.print(f"version {version.get('number')} {version.get('id')} is {version.get('status')}")
        if request is not None:
            print_request_outcome(request)

    @versions.command("promote")
    def promote(
        version_id: Annotated[str, typer.Argument(help="Id of a candidate version.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Release a candidate held by the release policy (admin): it becomes active, the
        request's records are forgotten and purged, and the request is completed."""
        _decide(version_id, "promote", url, api_key, as_json)

    @versions.command("reject")
    def reject(
        version_id: Annotated[str, typer.Argument(help="Id of a candidate version.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Reject a candidate (admin): its checkpoint is deleted, the request is rejected and
        its records stay present."""
        _decide(version_id, "reject", url, api_key, as_json)

    @receipt.command("get")
    def get(
        request_id: Annotated[str, typer.Argument(help="Id of a completed deletion request.")],
        output: Annotated[
            Path | None,
            typer.Option("-o", "--output", help="Write the receipt JSON here (else stdout)."),
        ] = None,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Fetch the signed erasure receipt of a completed request (`{jws, kid, payload}`);
        check it later with `lethe receipt verify`."""
        with _api(url, api_key) as api:
            document = api.get_receipt(request_id)
        if output is None:
            print_json(document)
            return
        output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        if as_json:
            print_json({"path": str(output), "kid": document.get("kid")})
            return
        payload = document.get("payload") or {}
        out.print(
            f"saved {output}: receipt for deletion request {request_id} "
            f"({(payload.get('records') or {}).get('count')} records), "
            f"signed with key {document.get('kid')}"
        )
