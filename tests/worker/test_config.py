"""Celery configuration, device resolution, worker identity and the `lethe worker` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.devtools.localserver import lethe_command
from service.settings import load_settings
from worker.celery_app import celery_config, create_celery
from worker.device import DeviceUnavailable, resolve_device
from worker.lease import holder_is_dead, worker_identity


def test_celery_config_is_safe_for_at_least_once_delivery(lethe_env: Path) -> None:
    settings = load_settings(
        broker_url="redis://127.0.0.1:6379/9",
        job_soft_time_limit_s=100,
        job_hard_time_limit_s=130,
        queue_name="gpu-a",
    )
    conf = celery_config(settings)
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["accept_content"] == conf["result_accept_content"] == ["json"]
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (100, 130)
    assert conf["broker_transport_options"]["visibility_timeout"] > 130
    assert conf["result_backend_transport_options"]["visibility_timeout"] > 130
    assert conf["task_default_queue"] == "gpu-a"
    assert conf["task_routes"]["lethe.run_job"] == {"queue": "gpu-a"}
    app = create_celery(settings)
    assert app.conf.task_acks_late is True and "worker.tasks" in app.conf.include
    import worker.tasks

    assert worker.tasks.run_job_task.name == "lethe.run_job"
    assert worker.tasks.run_job_task.acks_late and worker.tasks.run_job_task.reject_on_worker_lost


def test_device_resolution() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceUnavailable, match="LETHE_DEVICE"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
        with pytest.raises(DeviceUnavailable, match="visible"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(DeviceUnavailable, match="not available"):
            resolve_device("cuda:0")


def test_holder_liveness() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert holder_is_dead(worker_identity(int(proc.stdout)))
    assert not holder_is_dead(worker_identity())  # this very process
    assert not holder_is_dead(worker_identity(os.getppid()))  # alive
    assert not holder_is_dead("some-other-host:1:abc")  # cannot tell: not declared dead
    assert not holder_is_dead(None)


def test_lethe_worker_help_lists_its_options() -> None:
    out = subprocess.run(
        lethe_command("worker", "--help"),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    for option in ("--concurrency", "--pool", "--reaper", "--embedded"):
        assert option in out
