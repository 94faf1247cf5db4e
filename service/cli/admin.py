"""`lethe keys create|list|revoke`, `lethe audit verify`, `lethe receipt verify`: offline.

They talk to the configured database directly (no server needed), so the first admin key can
be created before anything is running. Every key change is written to the audit log.
"""

from __future__ import annotations

import getpass
import json
from typing import Annotated

import typer

from service.cli.common import cli_settings, command_group, open_database


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in some containers
        return "cli"



def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    keys = command_group(app, "keys", "Manage API keys (offline, against the configured database).")
    audit = command_group(app, "audit", "The hash-chained audit log.")
    receipt = command_group(app, "receipt", "Erasure receipts.")

    @keys.command("create")
    def keys_create(
        scope: Annotated[str, typer.Option(help="read, submit or admin.")] = "read",
        name: Annotated[str | None, typer.Option(help="Unique name (default: generated).")] = None,
    ) -> None:
        """Create an API key; the secret is printed once, as the last line of stdout."""
        from service.auth import ApiKeyError, create_key
        from service.db import transaction

        settings = cli_settings()
        engine, sessions = open_database(settings)
        try:
            with transaction(sessions) as session:
                key, secret = create_key(session, scope=scope, name=name, actor=_actor())
                key_name, key_scope = key.name, key.scope
        except ApiKeyError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        finally:
            engine.dispose()
        typer.echo(f"created key {key_name!r} with scope {key_scope} (shown once, store it now):",
                   err=True)
        typer.echo(secret)

    @keys.command("list")
    def keys_list(
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ) -> None:
        """List keys (never their secrets)."""
        from service.auth import list_keys
        from service.domain.views import iso

        settings = cli_settings()
        engine, sessions = open_database(settings)
        try:
            with sessions() as session:
                rows = [
                    {"id": k.id, "name": k.name, "scope": k.scope,
                     "created_at": iso(k.created_at), "revoked_at": iso(k.revoked_at)}
                    for k in list_keys(session)
                ]
        finally:
            engine.dispose()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            typer.echo("no keys")
        for row in rows:
            status = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
            typer.echo(f"{row['name']:<32} {row['scope']:<7} {status:<40} {row['id']}")

    @keys.command("revoke")
    def keys_revoke(
        name: Annotated[str, typer.Argument(help="Key name or id.")],
    ) -> None:
        """Revoke a key (idempotent); requests with it then get 401."""
        from service.auth import ApiKeyError, revoke_key
        from service.db import transaction

        settings = cli_settings()
        engine, sessions = open_database(settings)
        try:
            with transaction(sessions) as session:
                key = revoke_key(session, name, actor=_actor())
                key_name = key.name
        except ApiKeyError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        finally:
            engine.dispose()
        typer.echo(f"revoked key {key_name!r}")

    @audit.command("verify")
    def audit_verify() -> None:
        """Recompute the audit hash chain in the database; exit 1 if it is broken."""
        from service.audit import verify_chain

        settings = cli_settings()
        engine, sessions = open_database(settings)
        try:
            with sessions() as session:
                result = verify_chain(session)
        finally:
            engine.dispose()
        typer.echo(json.dumps(result, indent=2))
        if not result["ok"]:
            raise typer.Exit(1)

    @receipt.command("verify")
    def receipt_verify(
        file: Annotated[typer.FileText, typer.Argument(help="Receipt JSON file ('-' = stdin).")],
        key: Annotated[
            str | None, typer.Option(help="The HMAC key itself (prefer --key-env).")
        ] = None,
        key_env: Annotated[
            str | None, typer.Option(help="Name of an environment variable holding the key.")
        ] = None,
        key_file: Annotated[
            str | None, typer.Option(help="A file holding the key (e.g. a copy of "
                                     "LETHE_HOME/receipt-hmac.key).")
        ] = None,
    ) -> None:
        """Check an erasure receipt's signature offline; exit 1 when it was modified.

        Without a key option the installation's key is used: LETHE_RECEIPT_HMAC_KEY, else
        LETHE_HOME/receipt-hmac.key.
        """
        import os
        from pathlib import Path

        from service.receipts import ReceiptError, read_key_file, verify
        from service.receipts import key_file as default_key_file

        try:
            if key is not None:
                secret = key.encode("utf-8")
            elif key_env is not None:
                value = os.environ.get(key_env)
                if not value:
                    raise ReceiptError(f"environment variable {key_env} is not set")
                secret = value.encode("utf-8")
            elif key_file is not None:
                secret = read_key_file(Path(key_file))
            else:
                settings = cli_settings()
                if settings.receipt_hmac_key:
                    secret = settings.receipt_hmac_key.encode("utf-8")
                else:
                    path = default_key_file(settings)
                    if not path.exists():
                        raise ReceiptError(
                            f"no key: set LETHE_RECEIPT_HMAC_KEY, or pass --key-env/--key-file "
                            f"({path} does not exist)"
                        )
                    secret = read_key_file(path)
        except (ReceiptError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        try:
            document = json.loads(file.read())
        except json.JSONDecodeError as exc:
            typer.echo(f"INVALID: not JSON ({exc.msg} at line {exc.lineno})", err=True)
            raise typer.Exit(1) from None
        try:
            summary = verify(document, secret)
        except ReceiptError as exc:
            typer.echo(f"INVALID: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(
            f"OK: receipt for deletion request {summary['request_id']} "
            f"({summary['records']} records, issued {summary['issued_at']}) "
            f"signed with key {summary['key_id']}"
        )
