"""Helpers shared by the server and admin commands: settings and a database at head."""

from __future__ import annotations

import typer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings, SettingsError, load_settings


def cli_settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def auto_migrates(settings: Settings) -> bool:
    """Only the embedded default database (no LETHE_DATABASE_URL) is upgraded implicitly;
    any configured database is upgraded explicitly with `lethe migrate`."""
    return not settings.database_url


def ensure_schema(settings: Settings) -> None:
    from service.storage import migrate
    from service.storage.db import make_engine

    if auto_migrates(settings):
        migrate.upgrade(settings.db_url)
        return
    engine = make_engine(settings.db_url)
    try:
        migrate.check_at_head(engine)
    except migrate.SchemaBehind as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    except Exception as exc:
        typer.echo(f"error: cannot reach the database {engine.url!r}: {exc}", err=True)
        raise typer.Exit(3) from None
    finally:
        engine.dispose()


def open_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    from service.storage.db import make_engine, make_session_factory

    ensure_schema(settings)
    engine = make_engine(settings.db_url)
    return engine, make_session_factory(engine)


def command_group(app: typer.Typer, name: str, help_text: str) -> typer.Typer:
    """The sub-app called `name`, shared by every module that adds commands to it."""
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    sub = typer.Typer(help=help_text, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub
