"""Fixtures for the service tests: migrated databases, sessions, data files and checkpoints."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.storage import migrate
from service.storage.db import make_engine, make_session_factory


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """The parametrised (SQLite, PostgreSQL) database, upgraded to the migration head."""
    migrate.upgrade(database_url)
    return database_url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    eng = make_engine(migrated_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits: 1797 real 8x8 images, as float32 inputs and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


# --- API fixtures -------------------------------------------------------------------------

MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}


def mlp_weights(seed: int = 0, **kwargs) -> bytes:
    """A real `mlp` state dict for 8x8 digits, as safetensors bytes."""
    import torch
    from safetensors.torch import save

    from worker.imu.architectures import build

    torch.manual_seed(seed)
    model = build("mlp", **(MLP_KWARGS | kwargs))
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.fixture
def settings(lethe_env, migrated_url: str, storage_dir):
    from service.settings import load_settings

    return load_settings(database_url=migrated_url, storage_url=str(storage_dir))


@pytest.fixture
def api_keys(settings) -> dict[str, str]:
    """One key per scope, created the way `lethe keys create` does."""
    from service.api.auth import create_key
    from service.storage.db import transaction

    engine = make_engine(settings.db_url)
    factory = make_session_factory(engine)
    out = {}
    with transaction(factory) as session:
        for scope in ("read", "submit", "admin"):
            _, secret = create_key(session, scope=scope, name=f"test-{scope}")
            out[scope] = secret
    engine.dispose()
    return out


class Api:
    """A TestClient with helpers that register the usual fixtures."""

    def __init__(self, client, keys: dict[str, str]) -> None:
        self.client = client
        self.keys = keys

    def h(self, scope: str = "admin", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[scope]}", **extra}

    def upload_dataset(
        self,
        content: bytes,
        *,
        name="digits",
        kind="tensor",
        role="train",
        filename="data.npz",
        scope="admin",
    ):
        return self.client.post(
            "/v1/datasets",
            headers=self.h(scope),
            data={"name": name, "kind": kind, "role": role},
            files={"file": (filename, content, "application/octet-stream")},
        )

    def register_model(
        self, spec: dict, weights: bytes, *, filename="w.safetensors", scope="admin"
    ):
        return self.client.post(
            "/v1/models",
            headers=self.h(scope),
            data={"spec": __import__("json").dumps(spec)},
            files={"weights": (filename, weights, "application/octet-stream")},
        )


def digits_npz(digits, n: int | None = None, prefix: str = "digit-") -> bytes:
    x, y = digits
    n = n or len(y)
    return npz_bytes(ids=np.array([f"{prefix}{i}" for i in range(n)]), inputs=x[:n], labels=y[:n])


@pytest.fixture
def api(settings, api_keys) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Api(client, api_keys)


@pytest.fixture
def registered(api: Api, digits) -> dict:
    """A train dataset (first 300 digits), eval dataset and a registered `mlp` model."""
    train = api.upload_dataset(digits_npz(digits, 300))
    assert train.status_code == 201, train.text
    ev = api.upload_dataset(
        digits_npz(digits, 100, prefix="eval-"), name="digits-eval", role="eval"
    )
    assert ev.status_code == 201, ev.text
    spec = {
        "name": "digits-mlp",
        "architecture": "mlp",
        "arch_kwargs": MLP_KWARGS,
        "eval_dataset": ev.json()["id"],
    }
    weights = mlp_weights()
    model = api.register_model(spec, weights)
    assert model.status_code == 201, model.text
    return {"train": train.json(), "eval": ev.json(), "model": model.json(), "weights": weights}
