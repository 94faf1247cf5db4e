"""The review workflow through the `lethe` CLI against a real `lethe serve`: a request held by
the release policy, seen in `requests list|show`, promoted or rejected with `versions`, its
receipt fetched and verified; whole values when piped; help that names every option."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli.api_client import LetheAPIError, LetheClient
from service.cli.jobs import EXIT_CODES

from .conftest import Server

pytestmark = pytest.mark.slow

FAST = {"epochs": 1, "calibration": "off"}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def invoke(server: Server, *args: str) -> Any:
    from service.cli import app

    return CliRunner().invoke(app, list(args), env=server.env)


@pytest.fixture(scope="module")
def model(server: Server, digits_npz: Path, mlp_weights: Path) -> dict[str, str]:
    """A model without an eval dataset: every result is held for review (fails safe)."""
    with LetheClient(server.url, server.admin_key) as api:
        ds = api.upload_dataset(digits_npz, name="digits-review", kind="tensor", role="train")
        name = f"review-{uuid.uuid4().hex[:6]}"
        spec = {
            "name": name,
            "architecture": "mlp",
            "arch_kwargs": {"in_features": 64, "hidden": [32], "num_classes": 10},
        }
        api.register_model(spec, mlp_weights)
    return {"name": name, "dataset": ds["id"]}


def _forget(server: Server, model: dict[str, str], keys: list[str], tmp: Path, *extra: str) -> Any:
    keys_file = tmp / f"keys-{uuid.uuid4().hex[:6]}.txt"
    keys_file.write_text("\n".join(keys) + "\n")
    return invoke(
        server,
        "forget",
        "--model",
        model["name"],
        "--dataset",
        model["dataset"],
        "--keys-file",
        str(keys_file),
        "--params",
        json.dumps(FAST),
        "--wait",
        *extra,
    )


def test_held_request_is_reviewed_promoted_and_receipted(
    server: Server, model: dict[str, str], tmp_path: Path
) -> None:
    subject = f"ticket-{uuid.uuid4().hex[:6]}"
    held = _forget(server, model, ["d0200", "d0201"], tmp_path, "--subject-ref", subject)
    # The request's final state, not the job's: held for review, its own exit status.
    assert held.exit_code == EXIT_CODES["needs_review"] == 5, held.output
    assert "needs_review" in held.stdout and "candidate" in held.stdout
    assert "eval_acc_drop" in held.stdout  # the failed check, in the policy table
    match = re.search(rf"lethe versions promote ({UUID})", held.stdout)
    assert match, held.stdout
    version_id = match.group(1)

    # Piped output carries whole ids (no truncation, no wrapping) and the review state.
    listed = invoke(server, "requests", "list", "--status", "needs_review")
    assert listed.exit_code == 0, listed.output
    assert "…" not in listed.stdout
    rows = [line for line in listed.stdout.splitlines() if subject in line]
    assert len(rows) == 1 and "candidate" in rows[0], listed.stdout
    request_id = re.findall(UUID, rows[0])[0]
    as_json = json.loads(
        invoke(server, "requests", "list", "--subject-ref", subject, "--json").stdout
    )
    assert [r["id"] for r in as_json] == [request_id]
    assert as_json[0]["policy"]["decision"] == "candidate"

    shown = invoke(server, "requests", "show", request_id)
    assert shown.exit_code == 0, shown.output
    assert "release policy: candidate" in shown.stdout
    assert "forget_acc" in shown.stdout and "before" in shown.stdout  # metrics as a table
    assert '{"before"' not in shown.stdout  # not the metrics JSON in a cell
    # How it was answered: no eval dataset, so no membership evidence, and it says so.
    assert "attempt 1: imu held (membership-not-measured)" in shown.stdout
    assert "forgetting: approximate" in shown.stdout
    assert "membership: not measured" in shown.stdout
    jobs = invoke(server, "jobs", "list")
    assert as_json[0]["job"]["id"] in jobs.stdout and "…" not in jobs.stdout
    job_show = invoke(server, "jobs", "show", as_json[0]["job"]["id"])
    assert job_show.exit_code == 0 and "release policy: candidate" in job_show.stdout
    assert '"after"' not in job_show.stdout

    # No receipt before the records are gone.
    early = invoke(server, "receipt", "get", request_id)
    assert early.exit_code == 1 and "409" in early.stderr

    promoted = invoke(server, "versions", "promote", version_id)
    assert promoted.exit_code == 0, promoted.output
    assert f"version 2 {version_id} is active" in promoted.stdout
    assert f"deletion request {request_id}: completed" in promoted.stdout
    again = invoke(server, "versions", "promote", version_id)
    assert again.exit_code == 1 and "409" in again.stderr

    receipt = tmp_path / "receipt.json"
    got = invoke(server, "receipt", "get", request_id, "-o", str(receipt))
    assert got.exit_code == 0, got.output
    assert json.loads(receipt.read_text())["payload"]["request"]["id"] == request_id
    verified = invoke(
        server, "receipt", "verify", str(receipt), "--jwks", f"{server.url}/.well-known/jwks.json"
    )
    assert verified.exit_code == 0 and f"deletion request {request_id}" in verified.stdout
    summary = invoke(
        server,
        "receipt",
        "verify",
        str(receipt),
        "--jwks",
        f"{server.url}/.well-known/jwks.json",
        "--json",
    )
    assert summary.exit_code == 0 and json.loads(summary.stdout)["request_id"] == request_id
    # A JWKS with no keys cannot verify anything: "cannot read the keys" (2), not "invalid" (1).
    empty = tmp_path / "empty-jwks.json"
    empty.write_text('{"keys": []}')
    nothing = invoke(server, "receipt", "verify", str(receipt), "--jwks", str(empty))
    assert nothing.exit_code == 2 and "no keys" in nothing.output


def test_keys_create_json(server: Server) -> None:
    created = json.loads(server.service.run_cli("keys", "create", "--scope", "read", "--json"))
    assert created["scope"] == "read" and created["secret"]
    with LetheClient(server.url, created["secret"]) as api:
        assert api.list_requests(limit=1)["items"] is not None  # the key works for reads


def test_rejected_candidate_keeps_its_records(
    server: Server, model: dict[str, str], tmp_path: Path
) -> None:
    held = _forget(server, model, ["d0300"], tmp_path, "--json")
    assert held.exit_code == 5, held.output
    request = json.loads(held.stdout)  # --wait --json: the final request, not `queued`
    assert request["status"] == "needs_review" and request["job"]["status"] == "succeeded"
    rejected = invoke(server, "versions", "reject", request["result_version"]["id"], "--json")
    assert rejected.exit_code == 0, rejected.output
    answer = json.loads(rejected.stdout)
    assert answer["version"]["status"] == "rejected"
    assert answer["request"]["status"] == "rejected"
    # The record is present again, so it can be asked for once more.
    with LetheClient(server.url, server.admin_key) as api:
        records = list(api.iter_records(model["dataset"], state="forgotten"))
        assert "d0300" not in {r["key"] for r in records}
        rejected_list = api.list_requests(status="rejected", model=model["name"])
    assert request["id"] in {r["id"] for r in rejected_list["items"]}


def test_request_list_filters_and_cursor(server: Server, model: dict[str, str]) -> None:
    subject = f"page-{uuid.uuid4().hex[:6]}"
    with LetheClient(server.url, server.admin_key) as api:
        ids = [
            api.submit_deletion(
                model["name"],
                model["dataset"],
                [f"d03{i}{j}" for j in range(2)],
                params=FAST,
                subject_ref=subject,
            )["id"]
            for i in range(3, 6)
        ]
        seen, cursor = [], None
        while True:
            page = api.list_requests(subject_ref=subject, limit=2, cursor=cursor)
            assert len(page["items"]) <= 2
            seen += [r["id"] for r in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == ids[::-1]  # newest first, each once
        for request_id in ids:
            api.wait_for_request(request_id, poll_interval=0.2)
        assert {r["status"] for r in api.iter_requests(subject_ref=subject)} == {"needs_review"}
        assert list(api.iter_requests(subject_ref=subject, status="completed")) == []
        for params, status, slug in (
            ({"status": "done"}, 422, "validation-error"),
            ({"model": "no-such-model"}, 404, "not-found"),
            ({"cursor": "WyJ4Il0"}, 422, "invalid-cursor"),  # ["x"]: not this list's keys
        ):
            with pytest.raises(LetheAPIError) as problem:
                api.list_requests(**params)
            assert problem.value.status == status and problem.value.type.endswith(slug)


def test_download_progress_has_real_sizes(
    server: Server, model: dict[str, str], tmp_path: Path
) -> None:
    with LetheClient(server.url, server.admin_key) as api:
        version = api.get_model(model["name"])["active_version"]
    result = invoke(server, "versions", "download", version["id"], "-o", str(tmp_path / "w.st"))
    assert result.exit_code == 0, result.output
    size_kb = version["size_bytes"] / 1000
    assert f"{size_kb:.1f} kB of {size_kb:.1f} kB" in result.stderr
    assert "0.0 MB" not in result.stderr


def test_version_flag(server: Server) -> None:
    from service import __version__

    result = invoke(server, "--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"lethe {__version__}"


def test_every_option_has_help_and_params_lists_its_keys() -> None:
    import typer

    from service.cli import app

    command = typer.main.get_command(app)

    def walk(cmd: Any, path: str) -> list[str]:
        missing = []
        for param in cmd.params:
            if not getattr(param, "help", None) and param.name not in ("help",):
                missing.append(f"{path} {param.name}")
        for name, sub in getattr(cmd, "commands", {}).items():
            missing += walk(sub, f"{path} {name}")
        return missing

    assert walk(command, "lethe") == []
    from service.cli import app as cli_app

    help_text = CliRunner().invoke(cli_app, ["forget", "--help"], env={"COLUMNS": "200"}).stdout
    for key in ("top_data", "clip_quantile", "train_mode", "max_forget_acc", "require_review"):
        assert key in help_text, help_text
    assert "<bool>" not in help_text and "FileText" not in help_text
    assert "5 needs_review" in help_text  # the exit statuses are documented


def test_serve_start_up_is_quiet(server: Server) -> None:
    """No alembic plugin or migration-context lines at INFO: the log starts with what
    matters (workers, executor, the serving line)."""
    log = server.service.log_path.read_text(errors="replace")
    start_up = log.split("Application startup complete", 1)[0]
    assert "lethe.api lethe" in start_up and "serving (sqlite, embedded executor)" in start_up
    assert "alembic" not in start_up, start_up
    assert len([ln for ln in start_up.splitlines() if ln.strip()]) <= 8, start_up


def test_failed_and_cancelled_requests_have_their_own_exit_status(
    server: Server, model: dict[str, str], tmp_path: Path
) -> None:
    # A parameter prefix that names no layer: the job fails in the worker (a real fault).
    keys_file = tmp_path / "fail.txt"
    keys_file.write_text("d0380\n")
    failed = invoke(
        server,
        "forget",
        "--model",
        model["name"],
        "--dataset",
        model["dataset"],
        "--keys-file",
        str(keys_file),
        "--params",
        json.dumps({**FAST, "params": ["no_such_layer"]}),
        "--wait",
        "--json",
    )
    assert failed.exit_code == EXIT_CODES["failed"] == 6, failed.output
    request = json.loads(failed.stdout)
    assert request["status"] == "failed" and request["job"]["error"]["detail"]
    assert request["result_version"] is None and request["policy"] is None

    # Cancelled while queued behind a longer job of the same model; `forget --wait` with the
    # same Idempotency-Key follows that very request to its end.
    with LetheClient(server.url, server.admin_key) as api:
        api.submit_deletion(
            model["name"], model["dataset"], ["d0381"], params={**FAST, "epochs": 200}
        )
        key = f"cancel-{uuid.uuid4().hex}"
        queued = api.submit_deletion(
            model["name"], model["dataset"], ["d0382"], params=FAST, idempotency_key=key
        )
        api.cancel_job(queued["job"]["id"])
    keys_file.write_text("d0382\n")
    cancelled = invoke(
        server,
        "forget",
        "--model",
        model["name"],
        "--dataset",
        model["dataset"],
        "--keys-file",
        str(keys_file),
        "--params",
        json.dumps(FAST),
        "--idempotency-key",
        key,
        "--wait",
    )
    assert cancelled.exit_code == EXIT_CODES["cancelled"] == 7, cancelled.output
    assert f"deletion request {queued['id']}: cancelled" in cancelled.stdout
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
