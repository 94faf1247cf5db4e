"""`lethe worker`: run jobs — a Celery worker when LETHE_BROKER_URL is set, else the embedded
executor (the same job code, fed from the database).

Celery defaults: prefork pool (the device is initialised in the child that runs the job),
concurrency 1 (one job per GPU), consuming only LETHE_QUEUE_NAME, no gossip/mingle (faster
restarts), and the reaper thread in the main process (disable with --no-reaper when another
process runs it).
"""

from __future__ import annotations

import os

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""

    @app.command()
    def worker(
        concurrency: int = typer.Option(1, min=1, help="Jobs run at once (one per GPU)."),
        pool: str = typer.Option("prefork", help="Celery pool: prefork (default) or solo."),
        loglevel: str = typer.Option("", help="Log level (default: LETHE_LOG_LEVEL)."),
        hostname: str = typer.Option("lethe@%h", help="Celery node name."),
        reaper: bool = typer.Option(True, help="Run the lease reaper in this worker."),
        embedded: bool = typer.Option(
            False, help="Run the embedded executor even when a broker is configured."
        ),
    ) -> None:
        """Run jobs: a Celery worker (broker mode) or the embedded executor (no broker)."""
        from service.settings import SettingsError, get_settings

        try:
            settings = get_settings()
        except SettingsError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        if settings.embedded or embedded:
            from worker.embedded import main as embedded_main

            raise typer.Exit(embedded_main(["--no-watch-parent"]))
        if pool not in ("prefork", "solo"):
            typer.echo("--pool must be prefork or solo", err=True)
            raise typer.Exit(2)
        os.environ["LETHE_WORKER_REAPER"] = "1" if reaper else "0"
        from worker.celery_app import app as celery_app

        argv = [
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--queues={settings.queue_name}",
            f"--loglevel={(loglevel or settings.log_level).upper()}",
            f"--hostname={hostname}",
            "--without-gossip",
            "--without-mingle",
        ]
        celery_app.worker_main(argv)
