"""A real `lethe serve` (uvicorn, embedded executor, SQLite) on a free port for the CLI tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from service.devtools.localserver import LocalService


@dataclass
class Server:
    url: str
    admin_key: str
    service: LocalService
    files: Path

    @property
    def env(self) -> dict[str, str]:
        return {"LETHE_URL": self.url, "LETHE_API_KEY": self.admin_key}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("cli-home")
    files = tmp_path_factory.mktemp("cli-files")
    service = LocalService(home, env={"OMP_NUM_THREADS": "1", "LETHE_EMBEDDED_POLL_SECONDS": "0.2"})
    service.start()
    try:
        key = service.create_key("admin", "cli-tests")
        yield Server(service.url, key, service, files)
    finally:
        code = service.stop()
        assert not service.running
        assert code is not None


@pytest.fixture(scope="module")
def digits_npz(server: Server) -> Path:
    """400 real sklearn digits (flattened 64 features) with string ids, as the service expects."""
    from sklearn.datasets import load_digits

    data = load_digits()
    n = 400
    path = server.files / "digits.npz"
    np.savez(
        path,
        ids=np.array([f"d{i:04d}" for i in range(n)]),
        inputs=(data.data[:n] / 16.0).astype(np.float32),
        labels=data.target[:n].astype(np.int64),
    )
    return path


@pytest.fixture(scope="module")
def mlp_weights(server: Server) -> Path:
    """Untrained weights of the registered `mlp` architecture (registration checks shapes)."""
    import torch

    from worker.imu.architectures import build
    from worker.imu.checkpoints import save_safetensors

    torch.manual_seed(0)
    model = build("mlp", in_features=64, hidden=[32], num_classes=10)
    path = server.files / "mlp.safetensors"
    save_safetensors(model, path)
    return path
