"""The `lethe` command line: server processes, offline admin and an HTTP client.

Each command group lives in its own module and registers itself on the one Typer app.
"""

from __future__ import annotations

import typer

from service.cli import admin, client, server, workers

app = typer.Typer(
    name="lethe",
    help="Lethe: make trained PyTorch models forget data on request.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Lethe: make trained PyTorch models forget data on request."""


for _module in (server, admin, client, workers):
    _module.register(app)
