"""`lethe serve` in embedded mode (no broker, default SQLite): it migrates its own database,
supervises the executor child, a submitted job runs to completion, and stopping the server
stops the executor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import MLP_KWARGS, digits_npz, mlp_weights
from tests.service.netfaults import free_port

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    # Each thread lists the children it forked; the supervisor thread starts the executor.
    out = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(p) for p in path.read_text().split()]
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # zombies are dead
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_embedded_serve_runs_a_job_end_to_end(tmp_path: Path, digits) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env |= {
        "LETHE_HOME": str(tmp_path / "home"),
        "LETHE_LOG_LEVEL": "WARNING",
        "LETHE_EMBEDDED_POLL_SECONDS": "0.2",
        "OMP_NUM_THREADS": "1",
    }
    key = (
        subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", "create", "--scope", "admin"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.log"
            ).read_text()[-2000:]
            time.sleep(0.2)
        executors = [c for c in _children(proc.pid) if "worker.embedded" in _cmdline(c)]
        assert len(executors) == 1

        with httpx.Client(base_url=base, headers=headers, timeout=60) as c:
            ds = c.post(
                "/v1/datasets",
                data={"name": "d", "kind": "tensor", "role": "train"},
                files={"file": ("d.npz", digits_npz(digits, 200))},
            ).json()
            c.post(
                "/v1/models",
                data={
                    "spec": __import__("json").dumps(
                        {"name": "m", "architecture": "mlp", "arch_kwargs": MLP_KWARGS}
                    )
                },
                files={"weights": ("w.safetensors", mlp_weights())},
            ).raise_for_status()
            r = c.post(
                "/v1/deletion-requests",
                json={
                    "model": "m",
                    "dataset": ds["id"],
                    "record_keys": ["digit-1", "digit-2"],
                    "params": {"epochs": 2, "calibration": "off"},
                },
            )
            assert r.status_code == 202, r.text
            job_url = r.headers["location"]
            deadline = time.monotonic() + 180
            while True:
                job = c.get(job_url).json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert job["status"] == "succeeded", job
            assert job["result_version_id"] and job["progress"] == 1
            version = c.get(f"/v1/model-versions/{job['result_version_id']}").json()
            assert version["number"] == 2 and version["parent_id"] is not None
            # No eval dataset: no utility evidence, so the result waits for a reviewer.
            assert version["status"] == "candidate"
            promoted = c.post(f"/v1/model-versions/{version['id']}/promote")
            assert promoted.status_code == 200, promoted.text
            records = c.get(
                f"/v1/datasets/{ds['id']}/records", params={"state": "forgotten"}
            ).json()
            assert sorted(r["key"] for r in records["items"]) == ["digit-1", "digit-2"]
            assert c.get("/v1/audit/verify").json()["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0
    time.sleep(0.5)
    assert not [pid for pid in executors if _alive(pid)]
