"""`lethe serve`, `lethe migrate`, `lethe version`.

`serve` refuses a database behind the migration head (except the embedded default SQLite
database, which it upgrades itself) and, in embedded mode (no LETHE_BROKER_URL), supervises
the embedded executor `python -m worker.embedded` as a child process: restarted if it dies,
terminated when the server exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Annotated, Any

import typer

from service.cli.common import cli_settings, ensure_schema
from service.logs import configure_logging, dict_config

log = logging.getLogger("lethe.serve")

EXECUTOR_CMD = [sys.executable, "-m", "worker.embedded"]


class ExecutorSupervisor:
    """Keeps one embedded executor child alive; backs off when it keeps crashing."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd = cmd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="executor-supervisor", daemon=True)
        self.restarts = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, env=self.env)
            log.info("embedded executor started (pid %s)", self.proc.pid)
            while not self._stop.is_set() and self.proc.poll() is None:
                self._stop.wait(0.5)
            if self._stop.is_set():
                break
            code = self.proc.returncode
            backoff = 1.0 if time.monotonic() - started > 30 else min(backoff * 2, 30.0)
            log.warning("embedded executor exited with %s; restarting in %.0fs", code, backoff)
            self.restarts += 1
            self._stop.wait(backoff)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout)


MAX_PG_WORKERS = 4


def default_workers(db_url: str, cpus: int | None = None) -> int:
    """Worker processes for `lethe serve` when --workers is not given.

    SQLite: 1. Reads already run beside writes (WAL, deferred reads), and one process queues
    its writes on an in-process lock; several processes would meet in SQLite's busy handler,
    which polls with sleeps of up to 100 ms. PostgreSQL: one per CPU, at most 4: each process
    has a 20-connection pool, and 4 × 20 stays under the server's default max_connections
    (100).
    """
    if not db_url.startswith("postgresql"):
        return 1
    return max(1, min(cpus if cpus is not None else (os.cpu_count() or 1), MAX_PG_WORKERS))


def _exit_cleanly(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def quiet_alembic(level: str) -> None:
    """Alembic logs its plugin set-up and migration context at INFO on every start; only
    LETHE_LOG_LEVEL=DEBUG shows them. Upgrades still say what they did (lethe.serve)."""
    if logging.getLevelName(level.upper()) != logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""

    @app.command()
    def version() -> None:
        """Print the installed Lethe version."""
        from service import __version__

        typer.echo(__version__)

    @app.command()
    def migrate() -> None:
        """Upgrade the configured database to the latest migration (idempotent)."""
        from service.storage import migrate as migrations

        settings = cli_settings()
        try:
            revision = migrations.upgrade_url(settings.db_url)
        except Exception as exc:
            typer.echo(f"error: migration failed: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"database at migration {revision} (head)")

    @app.command()
    def serve(
        host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
        executor: Annotated[
            bool,
            typer.Option(
                "--executor/--no-executor",
                help="In embedded mode, also run the job executor as a child process.",
            ),
        ] = True,
        workers: Annotated[
            int | None,
            typer.Option(
                help="Uvicorn worker processes (default: chosen for the database: "
                "1 on SQLite, min(CPUs, 4) on PostgreSQL)."
            ),
        ] = None,
    ) -> None:
        """Run the HTTP API (and, without a broker, the embedded job executor)."""
        import uvicorn

        settings = cli_settings()
        configure_logging(settings.log_format, settings.log_level)
        # JSON: uvicorn's own loggers (access lines too) go through the same handler, in every
        # worker process (uvicorn applies `log_config` in each); text keeps uvicorn's format.
        uvicorn_logs: dict[str, Any] = {"log_level": settings.log_level.lower()}
        if settings.log_format == "json":
            uvicorn_logs["log_config"] = dict_config(settings.log_format, settings.log_level)
        quiet_alembic(settings.log_level)
        ensure_schema(settings)
        if workers is None:
            workers = default_workers(settings.db_url)
        log.info("serving with %d worker process(es)", workers)
        # Uvicorn shuts down gracefully on SIGTERM and then re-raises it to the previous
        # handler; with this one that ends in SystemExit(0), so `finally` stops the executor.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        supervisor = None
        if settings.embedded and executor:
            supervisor = ExecutorSupervisor(EXECUTOR_CMD, dict(os.environ))
            supervisor.start()
        try:
            if workers > 1:
                uvicorn.run(
                    "service.api.app:create_app",
                    factory=True,
                    host=host,
                    port=port,
                    workers=workers,
                    **uvicorn_logs,
                )
            else:
                from service.api.app import create_app

                uvicorn.run(
                    create_app(settings),
                    host=host,
                    port=port,
                    **uvicorn_logs,
                )
        finally:
            if supervisor is not None:
                supervisor.stop()
