"""schemathesis over the whole OpenAPI document against a real `lethe serve` on PostgreSQL
(where unstorable strings used to be a 500), bounded in time, with every check: no 5xx, every
status code and content type documented, answers that match their schemas, invalid input
rejected and valid input accepted (settings and their reasons: schemathesis.toml)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.api.auth import create_key
from service.storage import migrate
from service.storage.db import make_engine, make_session_factory, transaction
from tests.service.conftest import MLP_KWARGS, digits_npz, mlp_weights
from tests.service.netfaults import lethe_server, server_env

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
MAX_TIME_S = 60
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_every_check_passes_on_every_operation(postgres_url: str, tmp_path: Path, digits) -> None:
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    with transaction(make_session_factory(engine)) as s:
        _, secret = create_key(s, scope="admin", name="fuzz")
    engine.dispose()
    auth = {"Authorization": f"Bearer {secret}"}
    env = server_env(tmp_path, database_url=postgres_url)
    with lethe_server(env, tmp_path / "server.log") as (base, _proc):
        # Something to find: a dataset and a model, so not every id is a 404.
        ds = httpx.post(
            base + "/v1/datasets",
            headers=auth,
            timeout=60,
            data={"name": "fuzz", "kind": "tensor", "role": "train"},
            files={"file": ("d.npz", digits_npz(digits, 50), "application/x")},
        )
        assert ds.status_code == 201, ds.text
        spec = {"name": "fuzz-mlp", "architecture": "mlp", "arch_kwargs": MLP_KWARGS}
        model = httpx.post(
            base + "/v1/models",
            headers=auth,
            timeout=60,
            data={"spec": json.dumps(spec)},
            files={"weights": ("w.safetensors", mlp_weights(), "application/x")},
        )
        assert model.status_code == 201, model.text
        submitted = httpx.post(
            base + "/v1/deletion-requests",
            headers=auth,
            timeout=60,
            json={"model": "fuzz-mlp", "dataset": ds.json()["id"], "record_keys": ["digit-1"]},
        )
        assert submitted.status_code == 202, submitted.text
        # Real ids for the path parameters (schemathesis.toml reads them from the environment).
        ids = {
            "LETHE_FUZZ_DATASET": ds.json()["id"],
            "LETHE_FUZZ_MODEL": "fuzz-mlp",
            "LETHE_FUZZ_VERSION": model.json()["active_version"]["id"],
            "LETHE_FUZZ_REQUEST": submitted.json()["id"],
            "LETHE_FUZZ_JOB": submitted.json()["job"]["id"],
        }
        report = tmp_path / "report.json"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(CONFIG),
                "run",
                base + "/openapi.json",
                "--checks",
                "all",
                "-H",
                f"Authorization: Bearer {secret}",
                "--max-time",
                str(MAX_TIME_S),
                "-n",
                "40",
                "-w",
                "1",
                "--seed",
                "15",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--generation-allow-x00",
                "true",
                "--request-timeout",
                "30",
                "--no-color",
                "--report",
                "ndjson",
                "--report-ndjson-path",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=MAX_TIME_S + 240,
            env={**os.environ, **ids},
            cwd=tmp_path,  # its example cache stays out of the work tree
        )
        log = (tmp_path / "server.log").read_text()
        assert run.returncode == 0, run.stdout[-6000:] + log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        # It really exercised the API: every operation of the document, many requests.
        operations = sum(
            len(ops) for ops in httpx.get(base + "/openapi.json").json()["paths"].values()
        )
        assert f"Tested: {operations}" in run.stdout, run.stdout[-3000:]
        counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
        assert counts and int(counts[1]) == int(counts[2]) > 500, run.stdout[-3000:]
        assert report.stat().st_size > 1000
