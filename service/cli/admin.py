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
        as_json: Annotated[
            bool, typer.Option("--json", help="Print {id, name, scope, secret} as JSON.")
        ] = False,
    ) -> None:
        """Create an API key; the secret is printed once, as the last line of stdout."""
        from service.api.auth import ApiKeyError, create_key
        from service.storage.db import transaction

        settings = cli_settings()
        engine, sessions = open_database(settings)
        try:
            with transaction(sessions) as session:
                key, secret = create_key(session, scope=scope, name=name, actor=_actor())
                key_id, key_name, key_scope = key.id, key.name, key.scope
        except ApiKeyError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        finally:
            engine.dispose()
        if as_json:
            info = {"id": key_id, "name": key_name, "scope": key_scope, "secret": secret}
            typer.echo(json.dumps(info, indent=2))
            return
        typer.echo(
            f"created key {key_name!r} with scope {key_scope} (shown once, store it now):", err=True
        )
        typer.echo(secret)

    @keys.command("list")
    def keys_list(
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ) -> None:
        """List keys (never their secrets)."""
        from service.api.auth import list_keys
        from service.domain.views import iso

        settings = cli_settings()
        engine, sessions = open_database(settings)
        try:
            with sessions() as session:
                rows = [
                    {
                        "id": k.id,
                        "name": k.name,
                        "scope": k.scope,
                        "created_at": iso(k.created_at),
                        "revoked_at": iso(k.revoked_at),
                    }
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
        from service.api.auth import ApiKeyError, revoke_key
        from service.storage.db import transaction

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
    def audit_verify(
        jwks: Annotated[
            str | None,
            typer.Option(help="JWKS URL or file to trust (default: this installation's keys)."),
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the verification result as JSON.")
        ] = False,
    ) -> None:
        """Recompute the audit hash chain and check it against every signed checkpoint in
        object storage; exit 1 if it is broken, truncated or rewritten."""
        from service.storage.objects import Storage
        from service.trust.audit_checkpoints import verify_with_checkpoints
        from service.trust.signing import SignatureError, load_signer

        settings = cli_settings()
        try:
            keys = _load_jwks(jwks) if jwks else load_signer(settings).jwks()
        except (SignatureError, OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        engine, sessions = open_database(settings)
        try:
            with sessions() as session:
                result = verify_with_checkpoints(session, Storage.from_settings(settings), keys)
        finally:
            engine.dispose()
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        elif result["ok"]:
            typer.echo(
                f"audit chain intact: {result.get('checked')} events, head "
                f"{result.get('head_hash')}, checked against {result.get('checkpoints', 0)} "
                "signed checkpoint(s)"
            )
        else:
            typer.echo(
                f"audit chain BROKEN at seq {result.get('first_bad_seq')}: "
                f"{result.get('reason') or result.get('error') or 'see --json'}"
            )
        if not result["ok"]:
            raise typer.Exit(1)

    @receipt.command("verify")
    def receipt_verify(
        file: Annotated[
            typer.FileText,
            typer.Argument(help="Receipt: the API's JSON answer or the bare JWS ('-' = stdin)."),
        ],
        jwks: Annotated[
            str, typer.Option(help="JWKS URL (e.g. https://host/.well-known/jwks.json) or file.")
        ],
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the verification summary as JSON.")
        ] = False,
    ) -> None:
        """Check an erasure receipt with nothing but the issuer's public keys; exit 1 when it
        does not verify, 2 when the keys cannot be read."""
        from service.trust.receipts import ReceiptError, verify

        try:
            keys = _load_jwks(jwks)
        except Exception as exc:  # unreachable URL, bad file, not a JWKS: all "cannot read"
            typer.echo(f"error: cannot read the JWKS {jwks}: {exc}", err=True)
            raise typer.Exit(2) from None
        raw = file.read().strip()
        try:
            document = json.loads(raw) if raw.startswith("{") else raw
        except json.JSONDecodeError as exc:
            typer.echo(f"INVALID: not JSON ({exc.msg} at line {exc.lineno})", err=True)
            raise typer.Exit(1) from None
        try:
            summary = verify(document, keys)
        except ReceiptError as exc:
            typer.echo(f"INVALID: {exc}", err=True)
            raise typer.Exit(1) from None
        if as_json:
            typer.echo(json.dumps({k: v for k, v in summary.items() if k != "payload"}, indent=2))
            return
        typer.echo(
            f"OK: receipt for deletion request {summary['request_id']} "
            f"({summary['records']} records, issued {summary['issued_at']}) "
            f"signed with key {summary['key_id']}, audit checkpoint seq "
            f"{summary['checkpoint_seq']}"
        )


def _load_jwks(source: str) -> dict:
    """A JWKS from an http(s) URL or a file."""
    if source.startswith(("http://", "https://")):
        import httpx

        resp = httpx.get(source, timeout=10, follow_redirects=True)
        resp.raise_for_status()
        data = resp.json()
    else:
        from pathlib import Path

        data = json.loads(Path(source).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS (an object with a `keys` list)")
    if not data["keys"]:
        raise ValueError("the JWKS holds no keys: nothing could verify a signature")
    return data
