"""One definition per concept: UTC timestamps, backoff, Celery configuration, module sizes,
and the import-linter layer contracts."""

from __future__ import annotations

import ast
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.domain.backoff import backoff_delay
from service.domain.queue import CeleryQueue, celery_config
from service.settings import load_settings
from service.storage.tables import ApiKey, Base

ROOT = Path(__file__).resolve().parents[2]


def test_timestamps_read_back_aware_utc_on_sqlite(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'utc.db'}")
    Base.metadata.create_all(engine)
    local = datetime(2026, 1, 2, 5, 0, tzinfo=timezone(timedelta(hours=2)))
    with Session(engine) as session:
        session.add(ApiKey(name="k", key_hash="h" * 64, scope="read", created_at=local))
        session.commit()
    with Session(engine) as session:
        created = session.execute(select(ApiKey.created_at)).scalar_one()
        # Compared as a bound parameter too: the zone is normalised on the way in.
        found = session.execute(
            select(ApiKey.id).where(ApiKey.created_at == datetime(2026, 1, 2, 3, 0, tzinfo=UTC))
        ).scalar_one_or_none()
    assert created == datetime(2026, 1, 2, 3, 0, tzinfo=UTC) and created.tzinfo is UTC
    assert found is not None
    engine.dispose()


def test_one_backoff() -> None:
    assert [backoff_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(3, base=0.5, cap=30.0) == 4.0
    assert backoff_delay(10, base=15.0, cap=600.0) == 600.0


def test_api_sender_and_worker_share_the_celery_configuration(lethe_env: Path) -> None:
    from worker.celery_app import create_celery

    settings = load_settings(
        broker_url="redis://127.0.0.1:6379/9",
        job_soft_time_limit_s=100,
        job_hard_time_limit_s=130,
    )
    conf = celery_config(settings)
    assert conf["broker_transport_options"]["visibility_timeout"] == 130 * 2 + 60
    sender = CeleryQueue(settings)._app.conf
    worker = create_celery(settings).conf
    for key in ("broker_transport_options", "task_serializer", "accept_content"):
        assert sender[key] == worker[key] == conf[key]


def test_modules_are_small() -> None:
    sources = [
        p
        for folder in ("service", "worker")
        for p in (ROOT / folder).rglob("*.py")
        if "migrations" not in p.parts
    ]
    too_long = {
        str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > 500
    }
    assert not too_long, too_long


def test_the_layer_contracts_hold() -> None:
    """pyproject.toml [tool.importlinter]: the engine imports no service/Celery/HTTP/SQL, the
    service reaches the worker only through service.engine (and `lethe worker`), the layers
    point downwards and nothing below the API knows HTTP. `make lint` runs the same check."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_service_tree_shows_its_layers() -> None:
    top = sorted(p.name for p in (ROOT / "service").iterdir() if not p.name.startswith("__pycache"))
    layers = ["api", "cli", "devtools", "domain", "ingest", "storage", "trust"]
    shared = ["__init__.py", "py.typed", "settings.py", "engine.py", "errors.py", "logs.py"]
    shared += ["telemetry.py"]  # the metric families of the API and the worker (domain layer)
    assert top == sorted([*shared, *layers])
    for layer in layers:
        doc = ast.get_docstring(ast.parse((ROOT / "service" / layer / "__init__.py").read_text()))
        assert doc, f"service/{layer}/__init__.py says what the layer holds"


def test_matplotlib_is_only_an_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["demo"])
    # The server and the worker never import it ...
    code = (
        "import sys, service.api.app, service.cli, worker.execution, worker.celery_app; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    # ... and the demo skips its plot without it.
    from service.devtools.demo import DemoConfig, plot_per_class

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cfg = DemoConfig(home=tmp_path)
    assert plot_per_class([1.0], [0.5], cfg, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def test_the_formatter_owns_every_line() -> None:
    """No formatter-skip markers: the formatter's layout is the layout (issue 24, item 8)."""
    marker = "# fmt" + ": skip"  # spelt apart so this file does not match itself
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("service", "worker", "bench", "tests", "migrations")
        for path in (ROOT / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if marker in line
    ]
    assert found == []
