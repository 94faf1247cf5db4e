"""Programmatic Alembic: upgrade to head and tell whether a database is at head.

The scripts are the top-level `migrations` package, installed with `service` and `worker`;
`script_location` is that package's folder, so no alembic.ini is needed at runtime.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from service.storage.db import make_engine

# A regular package on disk (Alembic reads env.py and versions/ as files), never a zip.
SCRIPT_LOCATION = str(resources.files("migrations"))


class SchemaBehind(RuntimeError):
    """The database is not at the migration head; `lethe migrate` fixes it."""


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["url"] = url
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory(SCRIPT_LOCATION).get_heads()
    return heads[0] if len(heads) == 1 else ",".join(sorted(heads))


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
    return ",".join(sorted(heads)) if heads else None


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def check_at_head(engine: Engine) -> None:
    """Raise SchemaBehind with an actionable message unless the schema is current."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        raise SchemaBehind(
            f"the database is at migration {current or 'none (empty)'}, not at head {head}; "
            "run `lethe migrate` to upgrade it"
        )


def upgrade_url(url: str) -> str:
    """Upgrade and return the revision now current (used by `lethe migrate`)."""
    upgrade(url)
    engine = make_engine(url)
    try:
        return current_revision(engine) or ""
    finally:
        engine.dispose()
