"""A real Lethe stack for worker tests and bench/worker_latency.py.

- the API: `service.api.app.create_app` behind Starlette's TestClient (real HTTP semantics, real
  database, real queue hand-off to Redis);
- workers: real subprocesses (`lethe worker` / `celery -A worker.celery_app worker` /
  `python -m worker.embedded`) in their own process groups, so a test can SIGKILL a pool child
  or the whole worker;
- data: small models trained on scikit-learn's digits, registered through the API.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings, load_settings
from service.storage.db import make_engine, make_session_factory, transaction
from service.storage.tables import Job, ModelVersion, Record

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


# --------------------------------------------------------------------------- data


@dataclass
class Trained:
    """Digits split into train (members) / eval (held out), and trained checkpoints."""

    train_npz: bytes
    eval_npz: bytes
    probe_npz: bytes
    train_ids: list[str]
    weights: dict[str, bytes]  # architecture label -> safetensors bytes
    specs: dict[str, tuple[str, dict[str, Any]]]  # label -> (architecture, kwargs)


def npz(ids: list[str], inputs: np.ndarray, labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, ids=np.array(ids), inputs=inputs, labels=labels)
    return buf.getvalue()


def train_models(n_train: int = 1200, epochs: int = 25, batch_norm: bool = False) -> Trained:
    import torch
    from sklearn.datasets import load_digits

    from worker.imu.architectures import build
    from worker.imu.checkpoints import to_bytes
    from worker.imu.train import fit

    torch.manual_seed(0)
    data = load_digits()
    # Shuffled before the split: digits is ordered by writer, and an eval set of other
    # writers is a shifted population against which every training record looks remembered.
    order = np.random.default_rng(0).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype(np.float32)
    y = data.target[order].astype(np.int64)
    train_ids = [f"d{i:04d}" for i in range(n_train)]
    eval_ids = [f"e{i:04d}" for i in range(n_train, len(y))]
    probe_rows = list(range(n_train - 300, n_train))  # retained members, never forgotten
    specs: dict[str, tuple[str, dict[str, Any]]] = {
        "mlp": ("mlp", {"in_features": 64, "hidden": [32], "num_classes": 10}),
        "cnn": (
            "cnn",
            {
                "in_channels": 1,
                "num_classes": 10,
                "width": 8,
                **({"batch_norm": True} if batch_norm else {}),
            },
        ),
    }
    weights = {}
    for label, (arch, kwargs) in specs.items():
        model = build(arch, **kwargs)
        inputs = torch.from_numpy(x[:n_train])
        if arch == "cnn":
            inputs = inputs.reshape(-1, 1, 8, 8)
        fit(model, inputs, torch.from_numpy(y[:n_train]), epochs=epochs, lr=3e-3, device="cpu")
        weights[label] = to_bytes(model)
    # The CNN wants images: its datasets carry (1, 8, 8) inputs, the MLP's flat vectors.
    return Trained(
        train_npz=npz(train_ids, x[:n_train], y[:n_train]),
        eval_npz=npz(eval_ids, x[n_train:], y[n_train:]),
        probe_npz=npz([f"p{i:04d}" for i in probe_rows], x[probe_rows], y[probe_rows]),
        train_ids=train_ids,
        weights=weights,
        specs=specs,
    )


def image_npz(flat_npz: bytes) -> bytes:
    """The same dataset with (1, 8, 8) image inputs for the CNN."""
    with np.load(io.BytesIO(flat_npz), allow_pickle=False) as f:
        ids, inputs, labels = f["ids"], f["inputs"], f["labels"]
    buf = io.BytesIO()
    np.savez(buf, ids=ids, inputs=inputs.reshape(-1, 1, 8, 8), labels=labels)
    return buf.getvalue()


# --------------------------------------------------------------------------- settings


# For tests of per-request ordering, fencing and compounding: coalescing (worker.coalescing,
# tests/trust/test_coalescing.py) would otherwise serve queued requests together.
ONE_JOB_PER_REQUEST: dict[str, Any] = {"coalesce_max_records": 0}


def stack_settings(
    *,
    database_url: str,
    storage_dir: Path,
    broker_url: str = "",
    home: Path | None = None,
    **overrides: Any,
) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "broker_url": broker_url,
        "storage_url": str(storage_dir),
        "home": str(home or storage_dir.parent / "home"),
        "device": "cpu",
        "lease_seconds": 3.0,
        "heartbeat_seconds": 0.5,
        "reaper_interval_seconds": 0.5,
        "embedded_poll_seconds": 0.2,
        "queue_name": f"lethe-test-{uuid.uuid4().hex[:8]}",
        "job_soft_time_limit_s": 300,
        "job_hard_time_limit_s": 360,
        "max_attempts": 3,
        # These tests are about execution, not release decisions: every result is released
        # (tests/trust covers the policy). Production defaults hold poor results for review.
        "policy_max_eval_acc_drop": 1.0,
        "policy_max_forget_acc": 1.0,
        "policy_max_forget_auc_excess": 1.0,
        # The membership test at its loosest: a band of ±6.1 and "no signal" up to an
        # advantage of 0.5, so any model these tests train is released unchanged-or-not.
        "policy_max_membership_advantage": 0.5,
        "policy_membership_band": 1e-9,
    }
    values.update(overrides)
    return load_settings(**values)


def production_policy() -> dict[str, Any]:
    """The release policy a deployment runs with no LETHE_POLICY_* set (its defaults)."""
    return {n: f.default for n, f in Settings.model_fields.items() if n.startswith("policy_")}


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a subprocess needs to see exactly these settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LETHE_") or k.startswith("LETHE_TEST_")
    }
    for name in (
        "home",
        "database_url",
        "broker_url",
        "storage_url",
        "device",
        "max_attempts",
        "lease_seconds",
        "heartbeat_seconds",
        "reaper_interval_seconds",
        "embedded_poll_seconds",
        "queue_name",
        "job_soft_time_limit_s",
        "job_hard_time_limit_s",
        "log_level",
        "superseded_retention_s",
        "policy_max_eval_acc_drop",
        "policy_max_forget_acc",
        "policy_max_forget_auc_excess",
        "policy_max_false_release_rate",
        "policy_max_membership_advantage",
        "policy_membership_band",
        "escalation",
        "signing_key",
        "coalesce_max_records",
        "coalesce_max_records_exact",
        "coalesce_window_s",
        "log_format",
        "worker_metrics_port",
        "worker_metrics_addr",
    ):
        env["LETHE_" + name.upper()] = str(getattr(settings, name))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LETHE_TORCH_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------- API stack


@dataclass
class Stack:
    settings: Settings
    client: Any  # starlette TestClient
    headers: dict[str, str]
    sessions: sessionmaker[Session]
    models: dict[str, str] = field(default_factory=dict)  # label -> model name
    datasets: dict[str, str] = field(default_factory=dict)  # label -> dataset id

    # Registration -----------------------------------------------------------------------
    def upload(self, name: str, role: str, content: bytes) -> str:
        resp = self.client.post(
            "/v1/datasets",
            headers=self.headers,
            data={"name": name, "kind": "tensor", "role": role},
            files={"file": (f"{name}.npz", content, "application/octet-stream")},
        )
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def register(
        self,
        trained: Trained,
        label: str,
        name: str | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> str:
        """Upload this architecture's train/eval/probe datasets and register the model;
        ``recipe`` (without datasets) says it was trained on the uploaded train set."""
        flat = trained.specs[label][0] == "mlp"
        conv = (lambda b: b) if flat else image_npz
        suffix = uuid.uuid4().hex[:6]
        ids = {
            "train": self.upload(f"{label}-train-{suffix}", "train", conv(trained.train_npz)),
            "eval": self.upload(f"{label}-eval-{suffix}", "eval", conv(trained.eval_npz)),
            "probe": self.upload(
                f"{label}-probe-{suffix}", "member_probe", conv(trained.probe_npz)
            ),
        }
        arch, kwargs = trained.specs[label]
        name = name or f"{label}-{suffix}"
        spec = {
            "name": name,
            "architecture": arch,
            "arch_kwargs": kwargs,
            "eval_dataset": ids["eval"],
            "member_probe_dataset": ids["probe"],
        }
        if recipe is not None:
            spec["recipe"] = {**recipe, "datasets": [ids["train"]]}
        resp = self.client.post(
            "/v1/models",
            headers=self.headers,
            data={"spec": json.dumps(spec)},
            files={
                "weights": ("w.safetensors", trained.weights[label], "application/octet-stream")
            },  # noqa: E501
        )
        assert resp.status_code == 201, resp.text
        self.models[name] = ids["train"]
        return name

    # Jobs ---------------------------------------------------------------------------------
    def submit(
        self,
        model: str,
        keys: list[str],
        *,
        method: str = "imu",
        params: dict[str, Any] | None = None,
    ) -> str:
        body = {
            "model": model,
            "dataset": self.models[model],
            "record_keys": keys,
            "method": method,
            "params": params or {},
        }
        resp = self.client.post("/v1/deletion-requests", headers=self.headers, json=body)
        assert resp.status_code == 202, resp.text
        return resp.json()["job"]["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def cancel(self, job_id: str) -> Any:
        return self.client.post(f"/v1/jobs/{job_id}/cancel", headers=self.headers)

    def wait(
        self,
        job_ids: Iterable[str],
        statuses: tuple[str, ...] = TERMINAL,
        timeout: float = 120.0,
        on_tick: Any = None,
    ) -> dict[str, dict[str, Any]]:
        """Poll the database until every job is in one of `statuses`."""
        ids = list(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            rows = self.job_rows(ids)
            if all(rows[j].status in statuses for j in ids):
                return {j: self.job(j) for j in ids}
            if time.monotonic() > deadline:
                states = {j: (rows[j].status, rows[j].phase, rows[j].attempts) for j in ids}
                raise AssertionError(f"jobs not in {statuses} after {timeout} s: {states}")
            if on_tick is not None:
                on_tick()
            time.sleep(0.1)

    def job_rows(self, ids: list[str]) -> dict[str, Job]:
        with self.sessions() as session:
            rows = session.execute(select(Job).where(Job.id.in_(ids))).scalars().all()
            return {row.id: row for row in rows}

    def versions(self, model: str) -> list[dict[str, Any]]:
        resp = self.client.get(
            f"/v1/models/{model}/versions", headers=self.headers, params={"limit": 200}
        )
        assert resp.status_code == 200, resp.text
        items = resp.json()["items"]
        return sorted(items, key=lambda v: v["number"])

    def record_states(self, dataset_id: str, keys: list[str]) -> dict[str, str]:
        with self.sessions() as session:
            rows = session.execute(
                select(Record.key, Record.state).where(
                    Record.dataset_id == dataset_id, Record.key.in_(keys)
                )
            ).all()
        return dict(rows)

    def all_versions(self) -> list[ModelVersion]:
        with self.sessions() as session:
            return list(session.execute(select(ModelVersion)).scalars())


@contextmanager
def api_stack(settings: Settings) -> Iterator[Stack]:
    from starlette.testclient import TestClient

    from service.api.app import create_app
    from service.api.auth import create_key
    from service.storage import migrate

    migrate.upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        _, secret = create_key(session, scope="admin", name=f"t-{uuid.uuid4().hex[:8]}")
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            yield Stack(settings, client, {"Authorization": f"Bearer {secret}"}, sessions)
    finally:
        engine.dispose()


def assert_chains(stack: Stack, model: str, expected_jobs: list[str]) -> list[dict[str, Any]]:
    """Versions numbered 1..n without gaps, each the child of the previous, produced by the
    given jobs in this order; exactly one active (the last)."""
    versions = stack.versions(model)
    assert [v["number"] for v in versions] == list(range(1, len(expected_jobs) + 2))
    assert versions[0]["parent_id"] is None and versions[0]["job_id"] is None
    for parent, child in zip(versions, versions[1:], strict=False):
        assert child["parent_id"] == parent["id"]
    assert [v["job_id"] for v in versions[1:]] == expected_jobs
    assert [v["status"] for v in versions].count("active") == 1
    assert versions[-1]["status"] == "active"
    return versions


def job_checkpoint_files(storage_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(storage_dir).as_posix()
        for p in (storage_dir / "checkpoints").rglob("job-*")
        if p.is_file()
    )


# --------------------------------------------------------------------------- processes


class WorkerProcess:
    """A worker subprocess in its own process group; output goes to a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv, self.env, self.log_path = argv, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @classmethod
    def celery(cls, settings: Settings, log_path: Path, *, via_cli: bool = True) -> WorkerProcess:
        if via_cli:
            from service.devtools.localserver import lethe_command

            argv = lethe_command("worker", "--loglevel", "INFO")
        else:
            argv = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--pool=prefork",
                "--concurrency=1",
                f"--queues={settings.queue_name}",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ]
        return cls(argv, settings_env(settings), log_path)

    @classmethod
    def embedded(cls, settings: Settings, log_path: Path) -> WorkerProcess:
        return cls([sys.executable, "-m", "worker.embedded"], settings_env(settings), log_path)

    def start(self) -> WorkerProcess:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        try:
            out = subprocess.run(
                ["pgrep", "-P", str(self.pid)], capture_output=True, text=True, check=False
            ).stdout
        except FileNotFoundError:
            return []
        return [int(p) for p in out.split()]

    def kill_group(self) -> None:
        """SIGKILL the whole worker (main process and pool children): a machine dying."""
        if self.proc is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        else:
            # The main process is gone; make sure no orphaned child of its group survives.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> float:
    """Poll until predicate() is truthy; returns the seconds it took."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def poll(fetch: Any, timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Call fetch() until it returns something truthy; returns that value."""
    start = time.monotonic()
    while True:
        value = fetch()
        if value:
            return value
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or fetch}")
        time.sleep(interval)
