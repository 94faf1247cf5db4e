"""Temporary `.part` files left by a writer killed for real (SIGKILL mid-upload) are removed
after the age bound: by the API at start-up and by the reaper; a live writer's file is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from service.storage import migrate
from service.storage.objects import Storage
from tests.service.netfaults import lethe_server, server_env

WRITER = textwrap.dedent("""
    import sys, time
    from service.storage.objects import Storage

    def chunks():
        yield b"x" * 65536
        print("writing", flush=True)
        while True:  # a slow upload that never finishes
            time.sleep(0.05)
            yield b"y" * 1024

    Storage(sys.argv[1]).write_stream("datasets/big.npz", chunks())
""")


def _killed_writer(root: Path) -> Path:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)  # no `finally`, no cleanup: what a crash leaves
    assert proc.wait(10) == -signal.SIGKILL
    parts = list((root / ".tmp").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size >= 65536
    return parts[0]


def _live_writer(root: Path) -> tuple[subprocess.Popen, Path]:
    before = set((root / ".tmp").glob("*.part"))
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    (part,) = set((root / ".tmp").glob("*.part")) - before
    return proc, part


def test_reaper_sweep_removes_only_abandoned_files(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    storage = Storage(str(root))
    dead = _killed_writer(root)
    assert storage.sweep_temp(max_age_s=3600) == []  # too young: could be a live upload
    live, live_part = _live_writer(root)
    try:
        time.sleep(1.5)
        removed = storage.sweep_temp(max_age_s=1.0)
        assert removed == [dead.name] and not dead.exists()
        assert live_part.exists()  # still being written: its mtime is fresh
    finally:
        live.kill()
        live.wait()
    assert list(storage.iter_keys()) == []  # the key itself never appeared


def test_api_start_up_and_reaper_tick_remove_them(tmp_path: Path, sqlite_url: str) -> None:
    from service.settings import load_settings
    from service.storage.db import make_engine, make_session_factory
    from worker.reaper import Reaper

    root = tmp_path / "storage"
    migrate.upgrade(sqlite_url)
    first = _killed_writer(root)
    time.sleep(1.2)
    env = server_env(tmp_path, database_url=sqlite_url, temp_max_age_s="1")
    with lethe_server(env, tmp_path / "server.log") as (base, _proc):
        assert httpx.get(base + "/healthz").status_code == 200
        assert not first.exists()
    second = _killed_writer(root)
    time.sleep(1.2)
    settings = load_settings(
        home=str(tmp_path / "home"),
        database_url=sqlite_url,
        storage_url=str(root),
        temp_max_age_s=1.0,
    )
    engine = make_engine(sqlite_url)
    try:
        report = Reaper(
            settings, make_session_factory(engine), Storage(str(root)), actor="reaper"
        ).tick()
    finally:
        engine.dispose()
    assert report.swept == [second.name] and not second.exists()
