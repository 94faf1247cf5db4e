"""`lethe demo`: see Lethe forget data from a trained model in a few minutes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        fast: Annotated[
            bool, typer.Option("--fast", help="Smaller model, fewer epochs (used by the tests).")
        ] = False,
        home: Annotated[
            Path | None,
            typer.Option(help="State directory (default: LETHE_HOME, else ./.lethe)."),
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed for the split and the training.")] = 0,
    ) -> None:
        """Train a digits CNN, start the embedded service, forget data over HTTP, show results."""
        from rich.console import Console

        from service.devtools.demo import DemoConfig, run_demo

        home = home or Path(os.environ.get("LETHE_HOME") or "./.lethe")
        console = Console()
        try:
            run_demo(DemoConfig(home=home.resolve(), fast=fast, seed=seed), console)
        except Exception as exc:  # a demo should end with a readable reason, not a traceback
            console.print(f"[bold red]Demo failed:[/] {exc}", markup=True)
            console.print(f"Service log: {home.resolve() / 'demo' / 'service.log'}")
            raise typer.Exit(1) from exc
