"""`lethe` commands: server group."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""

    @app.command()
    def version() -> None:
        """Print the installed Lethe version."""
        from service import __version__

        typer.echo(__version__)
