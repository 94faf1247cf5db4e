"""`lethe serve` start-up: the worker count it picks, and one-time costs paid before serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.cli.server import MAX_PG_WORKERS, default_workers


def test_default_workers_per_database() -> None:
    assert default_workers("sqlite:///x.db", cpus=16) == 1
    assert default_workers("postgresql+psycopg://u@h/db", cpus=2) == 2
    assert default_workers("postgresql+psycopg://u@h/db", cpus=64) == MAX_PG_WORKERS
    assert default_workers("postgresql+psycopg://u@h/db", cpus=1) == 1


STARTUP = """
import sys
from fastapi.testclient import TestClient
from service.storage import migrate
from service.api.app import create_app
from service.settings import load_settings

url = "sqlite:///" + sys.argv[1]
migrate.upgrade(url)
app = create_app(load_settings(database_url=url, storage_url=sys.argv[2]))
assert "torch" not in sys.modules, "creating the app should stay cheap"
with TestClient(app) as client:
    # Start-up has run; no request was made yet.
    print("torch imported at start-up:", "torch" in sys.modules)
    assert client.get("/healthz").status_code == 200
"""


def test_torch_is_imported_at_start_up_not_on_the_first_request(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", STARTUP, str(tmp_path / "db.sqlite"), str(tmp_path / "storage")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch imported at start-up: True" in out.stdout
