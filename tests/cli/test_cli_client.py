"""`lethe` HTTP client commands against a real uvicorn server with the embedded executor."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli.api_client import LetheAPIError, LetheClient
from service.devtools.localserver import free_port, lethe_command

from .conftest import Server

pytestmark = pytest.mark.slow

ONE_EPOCH = {"epochs": 1, "calibration": "off"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, server: Server, *args: str, env: dict[str, str] | None = None):
    from service.cli import app

    return runner.invoke(app, list(args), env={**server.env, **(env or {})})


def invoke_json(runner: CliRunner, server: Server, *args: str) -> Any:
    result = invoke(runner, server, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def registered(server: Server, digits_npz: Path, mlp_weights: Path) -> dict[str, Any]:
    """One dataset and one model registered through the CLI (shared by the tests below)."""
    runner = CliRunner()
    ds = invoke_json(
        runner,
        server,
        "datasets",
        "upload",
        str(digits_npz),
        "--name",
        "digits-cli",
        "--role",
        "train",
    )
    name = f"mlp-{uuid.uuid4().hex[:6]}"
    model = invoke_json(
        runner,
        server,
        "models",
        "register",
        "--weights",
        str(mlp_weights),
        "--name",
        name,
        "--architecture",
        "mlp",
        "--arch-kwargs",
        json.dumps({"in_features": 64, "hidden": [32], "num_classes": 10}),
    )
    return {"dataset": ds, "model": model, "name": name}


def test_dataset_upload_list_show(
    runner: CliRunner, server: Server, registered: dict[str, Any], digits_npz: Path
) -> None:
    ds = registered["dataset"]
    assert ds["record_count"] == 400
    assert ds["sha256"] == hashlib.sha256(digits_npz.read_bytes()).hexdigest()
    listed = invoke_json(runner, server, "datasets", "list")
    assert ds["id"] in {d["id"] for d in listed}
    shown = invoke_json(runner, server, "datasets", "show", ds["id"], "--records")
    assert shown["name"] == "digits-cli"
    keys = [r["key"] for r in shown["records"]]
    assert len(keys) == 400 and set(keys) == {f"d{i:04d}" for i in range(400)}
    human = invoke(runner, server, "datasets", "show", ds["id"])
    assert human.exit_code == 0 and "digits-cli" in human.stdout


def test_model_register_list_show(
    runner: CliRunner, server: Server, registered: dict[str, Any], mlp_weights: Path
) -> None:
    model = registered["model"]
    assert model["name"] == registered["name"]
    assert model["active_version"]["number"] == 1
    assert model["active_version"]["sha256"] == hashlib.sha256(mlp_weights.read_bytes()).hexdigest()
    names = {m["name"] for m in invoke_json(runner, server, "models", "list")}
    assert registered["name"] in names
    shown = invoke_json(runner, server, "models", "show", registered["name"])
    assert [v["number"] for v in shown["versions"]] == [1]


def test_register_mismatched_weights_prints_problem(
    runner: CliRunner, server: Server, mlp_weights: Path
) -> None:
    result = invoke(
        runner,
        server,
        "models",
        "register",
        "--weights",
        str(mlp_weights),
        "--name",
        "wrong-shape",
        "--architecture",
        "mlp",
        "--arch-kwargs",
        json.dumps({"in_features": 64, "hidden": [16], "num_classes": 10}),
    )
    assert result.exit_code == 1
    assert "422" in result.stderr
    assert "fc" in result.stderr or "weight" in result.stderr  # names the mis-shaped keys


def test_forget_wait_then_jobs_and_records(
    runner: CliRunner, server: Server, registered: dict[str, Any], tmp_path: Path
) -> None:
    keys = ["d0000", "d0010", "d0020", "d0030"]
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# people who asked\n" + "\n".join(keys) + "\n\n")
    result = invoke(
        runner,
        server,
        "forget",
        "--model",
        registered["name"],
        "--dataset",
        registered["dataset"]["id"],
        "--keys-file",
        str(keys_file),
        "--wait",
        "--params",
        json.dumps({"epochs": 2, "calibration": "off"}),
        "--json",
    )
    # `--wait --json` prints the request in its final state: held for review (exit 5).
    out = json.loads(result.stdout)
    assert result.exit_code == 5, result.output
    assert out["status"] == "needs_review"
    job = out["job"]
    assert job["status"] == "succeeded", job
    assert job["result_version_id"] == out["result_version"]["id"]
    assert job["result_version_status"] == out["result_version"]["status"] == "candidate"
    assert "eval_acc_drop" in out["policy"]["failed"]

    shown = invoke_json(runner, server, "jobs", "show", job["id"])
    assert shown["status"] == "succeeded" and shown["result_version_id"] == job["result_version_id"]
    listed = invoke_json(runner, server, "jobs", "list", "--status", "succeeded")
    assert job["id"] in {j["id"] for j in listed}

    # The model has no eval dataset: without utility evidence the result waits for review,
    # and nothing is forgotten until a reviewer releases it.
    held = invoke_json(runner, server, "versions", "show", job["result_version_id"])
    assert held["status"] == "candidate"
    assert "eval_acc_drop" in held["metrics"]["policy"]["failed"]
    pending = invoke_json(
        runner,
        server,
        "datasets",
        "show",
        registered["dataset"]["id"],
        "--records",
        "--state",
        "forgotten",
    )
    assert pending["records"] == []
    import httpx

    promoted = httpx.post(
        f"{server.url}/v1/model-versions/{held['id']}/promote",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=30,
    )
    assert promoted.status_code == 200, promoted.text
    forgotten = invoke_json(
        runner,
        server,
        "datasets",
        "show",
        registered["dataset"]["id"],
        "--records",
        "--state",
        "forgotten",
    )
    assert sorted(r["key"] for r in forgotten["records"]) == sorted(keys)

    watch = invoke(runner, server, "jobs", "watch", job["id"])
    assert watch.exit_code == 0 and "succeeded" in watch.stdout

    version = invoke_json(runner, server, "versions", "show", job["result_version_id"])
    assert version["number"] == 2

    # Forgetting the same records again is refused with the offending keys listed.
    again = invoke(
        runner,
        server,
        "forget",
        "--model",
        registered["name"],
        "--dataset",
        registered["dataset"]["id"],
        "--keys-file",
        str(keys_file),
    )
    assert again.exit_code == 1
    assert "422" in again.stderr and "d0010" in again.stderr

    # A finished job cannot be cancelled: 409, printed as a problem.
    cancel = invoke(runner, server, "jobs", "cancel", job["id"])
    assert cancel.exit_code == 1 and "409" in cancel.stderr


def test_download_full_resumed_and_corrupted_prefix(
    runner: CliRunner, server: Server, registered: dict[str, Any], tmp_path: Path
) -> None:
    # The active version: superseded ones may already be retired (410).
    with LetheClient(server.url, server.admin_key) as api:
        version = api.get_version(api.get_model(registered["name"])["active_version"]["id"])
    version_id = version["id"]

    full = tmp_path / "full.safetensors"
    info = invoke_json(runner, server, "versions", "download", version_id, "-o", str(full))
    data = full.read_bytes()
    assert info["sha256"] == version["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["resumed_from"] == 0 and info["size_bytes"] == len(data)

    # A partial download is continued with a Range request, not fetched again.
    half = len(data) // 2
    resumed = tmp_path / "resumed.safetensors"
    Path(str(resumed) + ".part").write_bytes(data[:half])
    info = invoke_json(runner, server, "versions", "download", version_id, "-o", str(resumed))
    assert info["resumed_from"] == half
    assert resumed.read_bytes() == data and not Path(str(resumed) + ".part").exists()

    # A corrupted prefix is caught by the sha256 check and replaced by one clean download.
    bad = tmp_path / "bad.safetensors"
    Path(str(bad) + ".part").write_bytes(b"\0" * half)
    info = invoke_json(runner, server, "versions", "download", version_id, "-o", str(bad))
    assert info["resumed_from"] == 0 and bad.read_bytes() == data

    # The checkpoint loads into the registered architecture.
    from worker.imu.architectures import build
    from worker.imu.checkpoints import load_safetensors_into

    model = build("mlp", in_features=64, hidden=[32], num_classes=10)
    load_safetensors_into(model, full)


def test_forget_without_wait_then_watch(
    runner: CliRunner, server: Server, registered: dict[str, Any], tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(["d0101", "d0102", "d0103"]))
    accepted = invoke_json(
        runner,
        server,
        "forget",
        "--model",
        registered["name"],
        "--dataset",
        registered["dataset"]["id"],
        "--keys-file",
        str(keys_file),
        "--params",
        json.dumps({"epochs": 2, "calibration": "off"}),
    )
    assert accepted["job"]["status"] in {"queued", "running"}
    watch = invoke(runner, server, "jobs", "watch", accepted["job"]["id"], "--interval", "0.2")
    assert watch.exit_code == 0, watch.output
    assert "succeeded" in watch.stdout
    assert "unlearning" in watch.stderr  # the per-phase bars go to stderr


def test_idempotent_submission_through_the_client(
    server: Server, registered: dict[str, Any]
) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    with LetheClient(server.url, server.admin_key) as api:
        first = api.submit_deletion(
            registered["name"],
            registered["dataset"]["id"],
            ["d0200"],
            params=ONE_EPOCH,
            idempotency_key=key,
        )
        second = api.submit_deletion(
            registered["name"],
            registered["dataset"]["id"],
            ["d0200"],
            params=ONE_EPOCH,
            idempotency_key=key,
        )
        assert second["id"] == first["id"] and second["job"]["id"] == first["job"]["id"]
        with pytest.raises(LetheAPIError) as conflict:
            api.submit_deletion(
                registered["name"],
                registered["dataset"]["id"],
                ["d0201"],
                params=ONE_EPOCH,
                idempotency_key=key,
            )
        assert conflict.value.status == 409 and conflict.value.title
        seen: list[str] = []
        final = api.wait_for_job(
            first["job"]["id"], poll_interval=0.2, on_update=lambda job: seen.append(job["status"])
        )
        assert final["status"] == "succeeded" and seen[-1] == "succeeded"
        request = api.get_deletion_request(first["id"])
        assert request["id"] == first["id"]


def test_cancel_a_fresh_job(server: Server, registered: dict[str, Any]) -> None:
    """Cancelling right after submission either cancels it (202) or finds it finished (409)."""
    with LetheClient(server.url, server.admin_key) as api:
        accepted = api.submit_deletion(
            registered["name"],
            registered["dataset"]["id"],
            ["d0300", "d0301"],
            params={"epochs": 50, "calibration": "off"},
        )
        job_id = accepted["job"]["id"]
        try:
            api.cancel_job(job_id)
            cancelled = True
        except LetheAPIError as exc:
            assert exc.status == 409
            cancelled = False
        final = api.wait_for_job(job_id, poll_interval=0.2, timeout=120)
        assert final["status"] == ("cancelled" if cancelled else "succeeded")
        if cancelled:
            assert final["result_version_id"] is None


def test_audit_verify_and_log(
    runner: CliRunner, server: Server, registered: dict[str, Any]
) -> None:
    from service.cli import app

    audit_group = next(g for g in app.registered_groups if g.name == "audit").typer_instance
    names = {c.name for c in audit_group.registered_commands}
    verify_cmd = "verify" if "verify-remote" not in names else "verify-remote"
    result = invoke_json(runner, server, "audit", verify_cmd)
    assert result["ok"] is True and result["checked"] >= 3
    log_cmd = "log" if "log-remote" not in names else "log-remote"
    events = invoke_json(runner, server, "audit", log_cmd, "--limit", "500")
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert registered["dataset"]["id"] in {e["subject_id"] for e in events}


def test_errors_print_problem_and_exit_non_zero(runner: CliRunner, server: Server) -> None:
    missing = invoke(runner, server, "models", "show", "no-such-model")
    assert missing.exit_code == 1
    assert "404" in missing.stderr and "no-such-model" in missing.stderr

    unauthorised = invoke(runner, server, "datasets", "list", env={"LETHE_API_KEY": "wrong"})
    assert unauthorised.exit_code == 1 and "401" in unauthorised.stderr
    assert "LETHE_API_KEY" in unauthorised.stderr  # what to do about it

    unreachable = invoke(
        runner, server, "jobs", "list", env={"LETHE_URL": f"http://127.0.0.1:{free_port()}"}
    )
    assert unreachable.exit_code == 3 and "cannot reach" in unreachable.stderr
    assert "[bold" not in unreachable.stderr and "[/]" not in unreachable.stderr


def test_rough_edges_a_new_user_hits(
    runner: CliRunner,
    server: Server,
    registered: dict[str, Any],
    mlp_weights: Path,
    tmp_path: Path,
) -> None:
    # A keys file that is not there: a sentence, not a traceback.
    nope = invoke(
        runner,
        server,
        "forget",
        "--model",
        registered["name"],
        "--dataset",
        registered["dataset"]["id"],
        "--keys-file",
        str(tmp_path / "nope.txt"),
    )
    assert nope.exit_code == 2 and "Traceback" not in nope.output
    assert "cannot read" in nope.output and "nope.txt" in nope.output
    # Many bad keys: one short line each, at most ten, then how many more.
    keys = tmp_path / "many.txt"
    keys.write_text("\n".join(f"no-such-key-{i}" for i in range(40)))
    many = invoke(
        runner,
        server,
        "forget",
        "--model",
        registered["name"],
        "--dataset",
        registered["dataset"]["id"],
        "--keys-file",
        str(keys),
    )
    assert many.exit_code == 1 and "422" in many.stderr
    assert "and 30 more" in many.stderr and "no-such-key-0" in many.stderr
    assert len(many.stderr.splitlines()) < 20, many.stderr
    # A model registered without an eval dataset: said at once, with what to do.
    shown = invoke(
        runner,
        server,
        "models",
        "register",
        "--weights",
        str(mlp_weights),
        "--name",
        f"no-eval-{uuid.uuid4().hex[:6]}",
        "--architecture",
        "mlp",
        "--arch-kwargs",
        json.dumps(registered["model"]["arch_kwargs"]),
    )
    assert shown.exit_code == 0, shown.output
    assert "warning: no eval_dataset" in shown.stderr and "held" in shown.stderr
    # A misspelt name: the closest ones are offered; an unknown architecture lists them all.
    misspelt = invoke(runner, server, "models", "show", registered["name"] + "x")
    assert misspelt.exit_code == 1 and f"did you mean '{registered['name']}'" in misspelt.stderr
    typo = invoke(
        runner,
        server,
        "forget",
        "--model",
        registered["name"],
        "--dataset",
        "digits-clj",
        "--keys-file",
        str(keys),
    )
    assert typo.exit_code == 1 and "did you mean 'digits-cli'" in typo.stderr
    unknown = invoke(
        runner,
        server,
        "models",
        "register",
        "--weights",
        str(mlp_weights),
        "--name",
        "x-y",
        "--architecture",
        "mpl",
    )
    assert unknown.exit_code == 1 and "causal_lm" in unknown.stderr and "mlp" in unknown.stderr


def test_read_scope_cannot_submit(
    runner: CliRunner, server: Server, registered: dict[str, Any], tmp_path: Path
) -> None:
    read_key = server.service.create_key("read", f"reader-{uuid.uuid4().hex[:6]}")
    keys_file = tmp_path / "k.txt"
    keys_file.write_text("d0390\n")
    listed = invoke(runner, server, "models", "list", "--json", env={"LETHE_API_KEY": read_key})
    assert listed.exit_code == 0
    denied = invoke(
        runner,
        server,
        "forget",
        "--model",
        registered["name"],
        "--dataset",
        registered["dataset"]["id"],
        "--keys-file",
        str(keys_file),
        env={"LETHE_API_KEY": read_key},
    )
    assert denied.exit_code == 1 and "403" in denied.stderr


def test_installed_entry_point_talks_to_the_server(server: Server) -> None:
    """The real `lethe` executable, not the in-process runner."""
    proc = subprocess.run(
        lethe_command("models", "list", "--json"),
        env={**server.service.env, **server.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)


def test_help_says_a_dataset_may_be_named(runner: CliRunner) -> None:
    from service.cli import app

    shown = runner.invoke(app, ["models", "register", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0
    assert "Eval dataset: id or unique name." in shown.stdout
    assert "Member-probe dataset: id or unique name." in shown.stdout
    assert "--recipe" in shown.stdout
