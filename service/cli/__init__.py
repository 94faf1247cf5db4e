"""The `lethe` command line: server processes, offline admin and an HTTP client.

Each command group lives in its own module and registers itself on the one Typer app.
"""

from __future__ import annotations

from typing import Annotated

import typer

from service.cli import admin, client_commands, server, workers

app = typer.Typer(
    name="lethe",
    help="Lethe: make trained PyTorch models forget data on request.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from service import __version__

        typer.echo(f"lethe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the installed Lethe version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Lethe: make trained PyTorch models forget data on request."""


for _module in (server, admin, client_commands, workers):
    _module.register(app)
