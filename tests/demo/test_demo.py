"""`lethe demo --fast` end to end: the real command, a real server, the public HTTP API only."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from service.devtools.localserver import lethe_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    import os

    home = tmp_path_factory.mktemp("demo-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    proc = subprocess.run(
        lethe_command("demo", "--fast", "--home", str(home)),
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    return home, proc


def test_demo_succeeds_and_stops_the_service(demo_run) -> None:
    home, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Demo finished" in proc.stdout
    assert "Before / after each deletion request" in proc.stdout
    assert "training the CNN on" in proc.stdout  # a long step says so before it starts
    summary = json.loads((home / "demo" / "summary.json").read_text())
    # The service was stopped: its port no longer answers.
    import httpx

    url = proc.stdout.split(" on http://", 1)[1].split()[0]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{url}/healthz", timeout=2)
    assert [j["job"]["status"] for j in summary["jobs"]] == ["succeeded", "succeeded"]
    # Default requests (no params): released by the policy itself, no reviewer needed.
    assert [j["job"]["request_status"] for j in summary["jobs"]] == ["completed", "completed"]
    assert [j["promoted"] for j in summary["jobs"]] == [False, False]


def test_forgetting_happened_and_lineage_chains(demo_run) -> None:
    home, _ = demo_run
    summary = json.loads((home / "demo" / "summary.json").read_text())
    first, second = (j["job"] for j in summary["jobs"])
    before, after = first["metrics"]["before"], first["metrics"]["after"]
    assert before["forget_acc"] > 0.9
    assert after["forget_acc"] <= 0.05  # the whole class is forgotten
    # The other nine classes keep their accuracy on held-out records the controller never saw.
    kept = before["eval_acc_retained_classes"] - after["eval_acc_retained_classes"]
    assert kept <= 0.03, (before, after)
    assert first["metrics"]["influence"]["calibration"]["reason"] == "target-reached"
    assert second["source_version_id"] == first["result_version_id"]  # deletions compound
    assert summary["final_version"]["id"] == second["result_version_id"]
    assert summary["final_version"]["number"] == 3
    forget_class = summary["forget_class"]
    assert summary["per_class_before"][forget_class] > 0.8
    assert summary["per_class_after"][forget_class] < 0.3


def test_downloaded_checkpoint_matches_and_loads_into_the_architecture(demo_run) -> None:
    home, _ = demo_run
    summary = json.loads((home / "demo" / "summary.json").read_text())
    path = home / "demo" / "final.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == summary["final_version"]["sha256"]
    from worker.imu.architectures import build
    from worker.imu.checkpoints import load_safetensors_into

    # The architecture as registered with the service (the demo saved GET /v1/models/{name}).
    model = build(summary["architecture"], **summary["arch_kwargs"])
    result = load_safetensors_into(model, path)
    assert not result.missing_keys and not result.unexpected_keys


def test_audit_chain_verified_and_plot_written(demo_run) -> None:
    home, proc = demo_run
    summary = json.loads((home / "demo" / "summary.json").read_text())
    assert summary["audit"]["ok"] is True and summary["audit"]["checked"] >= 8
    plot = home / "demo" / "per_class_accuracy.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert str(plot) in proc.stdout.replace("\n", "")
