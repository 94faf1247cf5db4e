"""`lethe` commands that talk HTTP to a running service (LETHE_URL, LETHE_API_KEY).

Every command takes `--json` for scripts; any API error prints the problem's title and
detail on stderr and exits non-zero (1 for an API error, 3 when the server is unreachable,
4 when a download does not match its sha256; `forget --wait` ends with the request's state:
0 completed, 5 needs_review, 6 failed, 7 cancelled, 8 rejected).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.api_client import (
    DEFAULT_URL,
    ChecksumMismatch,
    LetheAPIError,
    LetheClient,
    LetheConnectionError,
)
from service.cli.common import command_group
from service.cli.render import cell as _cell
from service.cli.render import err, human_size, metrics_table, out, policy_table
from service.cli.render import kv as _kv
from service.cli.render import print_json as _print_json
from service.cli.render import table as _table
from service.domain.states import DATASET_ROLES

__all__ = ["JsonOpt", "KeyOpt", "UrlOpt", "_api", "_cell", "_kv", "_print_json", "_table", "err"]

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="LETHE_URL", help="Service base URL.", show_default=True)
]
KeyOpt = Annotated[
    str,
    typer.Option("--api-key", envvar="LETHE_API_KEY", help="Bearer API key.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]


@contextmanager
def _api(url: str, api_key: str) -> Iterator[LetheClient]:
    """A client whose errors become a readable message and a non-zero exit status."""
    try:
        with LetheClient(url, api_key) as client:
            yield client
    except LetheAPIError as exc:
        err.print(f"Error {exc.status}: {exc.title}", style="bold red", markup=False)
        if exc.detail:
            err.print(exc.detail, markup=False)
        for line in error_lines(exc.errors or []):
            err.print(line, markup=False)
        if exc.status == 401:
            err.print(
                "hint: pass a key with --api-key or LETHE_API_KEY (create one with "
                "`lethe keys create NAME --scope submit`)",
                markup=False,
            )
        raise typer.Exit(1) from None
    except LetheConnectionError as exc:
        err.print(f"Error: {exc}", style="bold red", markup=False)
        raise typer.Exit(3) from None
    except ChecksumMismatch as exc:
        err.print(f"Error: {exc}", style="bold red", markup=False)
        raise typer.Exit(4) from None


def answer(
    url: str,
    api_key: str,
    as_json: bool,
    call: Callable[[LetheClient], Any],
    show: Callable[[Any], None],
) -> Any:
    """One API call: its raw JSON with --json, else `show` renders it for a person."""
    with _api(url, api_key) as api:
        value = call(api)
    if as_json:
        _print_json(value)
    else:
        show(value)
    return value


MAX_ERROR_LINES = 10


def error_lines(errors: list[dict[str, Any]]) -> list[str]:
    """One short line per error (field or key, then the message), at most MAX_ERROR_LINES."""
    lines = []
    for e in errors[:MAX_ERROR_LINES]:
        where = e.get("field") or e.get("key") or ""
        extra = {k: v for k, v in e.items() if k not in ("field", "message")}
        tail = f" ({json.dumps(extra, default=str)})" if extra else ""
        lines.append(f"  - {where}: {e.get('message', '')}{tail}" if where else f"  - {e}")
    if len(errors) > MAX_ERROR_LINES:
        lines.append(f"  … and {len(errors) - MAX_ERROR_LINES} more (--json shows them all)")
    return lines


def read_keys_file(path: Path) -> list[str]:
    """Record keys from a file: a JSON array, or one key per line (`#` comments, blanks skipped).

    `-` reads standard input.
    """
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise typer.BadParameter(f"cannot read {path}: {why}", param_hint="--keys-file") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            keys = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(
                f"{path} starts like a JSON array but is not JSON: {exc.msg} (line {exc.lineno})",
                param_hint="--keys-file",
            ) from None
        if not isinstance(keys, list):
            raise typer.BadParameter("the JSON must be an array of keys", param_hint="--keys-file")
        if not all(isinstance(k, str) for k in keys):
            raise typer.BadParameter("the JSON array must hold strings", param_hint="--keys-file")
        return keys
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _has_command(group: typer.Typer, name: str) -> bool:
    for info in group.registered_commands:
        cmd_name = info.name or (info.callback.__name__.replace("_", "-") if info.callback else "")
        if cmd_name == name:
            return True
    return False


def register(app: typer.Typer) -> None:
    """Attach the HTTP client commands (and `lethe demo`) to the root app."""
    _register_datasets(app)
    _register_models(app)
    from service.cli import jobs

    jobs.register_forget(app)
    jobs.register_jobs(app)
    _register_versions(app)
    from service.cli import review

    review.register(app)
    _register_audit(app)

    from service.cli import demo

    demo.register(app)


# -- datasets -------------------------------------------------------------------------------
def _register_datasets(app: typer.Typer) -> None:
    datasets = command_group(app, "datasets", "Upload and inspect datasets.")

    @datasets.command("upload")
    def upload(
        file: Annotated[
            Path,
            typer.Argument(
                exists=True, dir_okay=False, readable=True, help="The .npz or .jsonl file."
            ),
        ],
        name: Annotated[str, typer.Option(help="Dataset name.")],
        role: Annotated[str, typer.Option(help=" | ".join(DATASET_ROLES))] = "train",
        kind: Annotated[str, typer.Option(help="tensor (.npz) | text (.jsonl)")] = "",
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Upload a dataset file (.npz tensors or .jsonl text)."""
        kind = kind or ("text" if file.suffix.lower() in (".jsonl", ".json") else "tensor")
        with _api(url, api_key) as api:
            ds = api.upload_dataset(file, name=name, kind=kind, role=role)
        if as_json:
            _print_json(ds)
        else:
            out.print(
                f"uploaded dataset [bold]{ds.get('name')}[/] id={ds.get('id')} "
                f"records={ds.get('record_count')} sha256={ds.get('sha256')}"
            )

    @datasets.command("list")
    def list_(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False) -> None:
        """List datasets."""
        columns = ["id", "name", "kind", "role", "record_count", "created_at"]
        answer(
            url,
            api_key,
            as_json,
            lambda api: list(api.iter_datasets()),
            lambda items: _table(items, columns, "datasets"),
        )

    @datasets.command("show")
    def show(
        dataset_id: Annotated[str, typer.Argument(help="Dataset id.")],
        records: Annotated[bool, typer.Option(help="Also list the record keys.")] = False,
        state: Annotated[str | None, typer.Option(help="present | forgotten")] = None,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Show one dataset (and optionally its records)."""
        with _api(url, api_key) as api:
            ds = api.get_dataset(dataset_id)
            recs = list(api.iter_records(dataset_id, state=state)) if records else None
        if as_json:
            _print_json({**ds, "records": recs} if recs is not None else ds)
            return
        _kv(ds, f"dataset {dataset_id}")
        if recs is not None:
            _table(recs, ["key", "state", "forgotten_at"], f"{len(recs)} records")


# -- models ---------------------------------------------------------------------------------
def _register_models(app: typer.Typer) -> None:
    models = command_group(app, "models", "Register and inspect models.")

    @models.command("register")
    def register_(
        weights: Annotated[Path, typer.Option(exists=True, dir_okay=False, help=".safetensors")],
        spec: Annotated[
            Path | None, typer.Option(exists=True, dir_okay=False, help="Spec JSON file.")
        ] = None,
        name: Annotated[str | None, typer.Option(help="Model name (without --spec).")] = None,
        architecture: Annotated[str | None, typer.Option(help="Architecture name.")] = None,
        arch_kwargs: Annotated[str, typer.Option(help="Architecture kwargs as JSON.")] = "{}",
        eval_dataset: Annotated[
            str | None, typer.Option(help="Eval dataset: id or unique name.")
        ] = None,
        member_probe_dataset: Annotated[
            str | None, typer.Option(help="Member-probe dataset: id or unique name.")
        ] = None,
        description: Annotated[
            str | None, typer.Option(help="Free text shown with the model.")
        ] = None,
        recipe: Annotated[
            Path | None,
            typer.Option(
                exists=True,
                dir_okay=False,
                help="Training recipe JSON: how version 1 was trained, for exact forgetting. "
                "Classifiers: epochs, lr, batch_size, weight_decay, seed, init_seed, datasets. "
                "causal_lm: base_version (the registered base), method (full | lora), epochs, "
                "lr, batch_size, max_length, seed, lora_r, lora_alpha, lora_targets, datasets.",
            ),
        ] = None,
        config: Annotated[
            Path | None,
            typer.Option(exists=True, dir_okay=False, help="causal_lm: config.json."),
        ] = None,
        tokenizer: Annotated[
            Path | None,
            typer.Option(exists=True, dir_okay=False, help="causal_lm: tokenizer.json."),
        ] = None,
        tokenizer_config: Annotated[
            Path | None,
            typer.Option(exists=True, dir_okay=False, help="causal_lm: tokenizer_config.json."),
        ] = None,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Register a model: a spec (file or options) and its safetensors weights."""
        if spec is not None:
            body: dict[str, Any] = json.loads(spec.read_text(encoding="utf-8"))
        else:
            if not name or not architecture:
                raise typer.BadParameter("give --spec, or --name and --architecture")
            body = {
                "name": name,
                "architecture": architecture,
                "arch_kwargs": json.loads(arch_kwargs),
            }
        for key, value in (
            ("eval_dataset", eval_dataset),
            ("member_probe_dataset", member_probe_dataset),
            ("description", description),
        ):
            if value is not None:
                body[key] = value
        if recipe is not None:
            try:
                body["recipe"] = json.loads(recipe.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise typer.BadParameter(f"{recipe} is not JSON: {exc.msg}") from None
        extra = {
            field: path
            for field, path in (
                ("config", config),
                ("tokenizer", tokenizer),
                ("tokenizer_config", tokenizer_config),
            )
            if path is not None
        }
        with _api(url, api_key) as api:
            model = api.register_model(body, weights, extra)
        if as_json:
            _print_json(model)
        else:
            version = model.get("active_version") or {}
            out.print(
                f"registered model [bold]{model.get('name')}[/] "
                f"({model.get('architecture')}) version {version.get('number')} "
                f"id={version.get('id')} sha256={version.get('sha256')}"
            )
            for warning in model.get("warnings") or []:
                err.print(f"warning: {warning}", style="yellow", markup=False)

    @models.command("list")
    def list_(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False) -> None:
        """List models."""

        def show(items: list[dict[str, Any]]) -> None:
            rows = [{**m, "active": (m.get("active_version") or {}).get("number")} for m in items]
            _table(rows, ["name", "architecture", "active", "created_at"], "models")

        answer(url, api_key, as_json, lambda api: list(api.iter_models()), show)

    @models.command("show")
    def show(
        name: Annotated[str, typer.Argument(help="Model name.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Show a model and its versions."""
        with _api(url, api_key) as api:
            model = api.get_model(name)
            versions = api.list_versions(name).get("items", [])
        if as_json:
            _print_json({**model, "versions": versions})
            return
        _kv({k: v for k, v in model.items() if k != "active_version"}, f"model {name}")
        _table(versions, ["id", "number", "status", "parent_id", "job_id", "sha256"], "versions")


# -- versions -------------------------------------------------------------------------------
def _register_versions(app: typer.Typer) -> None:
    versions = command_group(app, "versions", "Inspect and download model versions.")

    @versions.command("show")
    def show(
        version_id: Annotated[str, typer.Argument(help="Model version id.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Show one model version: lineage, sha256, metrics."""

        def show_version(version: dict[str, Any]) -> None:
            metrics = version.get("metrics") or {}
            _kv({k: v for k, v in version.items() if k != "metrics"}, f"version {version_id}")
            metrics_table(metrics)
            policy_table(metrics.get("policy"))

        answer(url, api_key, as_json, lambda api: api.get_version(version_id), show_version)

    @versions.command("download")
    def download(
        version_id: Annotated[str, typer.Argument(help="Model version id.")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Destination file.")],
        no_resume: Annotated[
            bool, typer.Option("--no-resume", help="Ignore a partial file.")
        ] = False,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Download a version's checkpoint (resumes a partial `.part` file, checks sha256)."""
        with _api(url, api_key) as api:
            result = api.download_checkpoint(
                version_id,
                output,
                resume=not no_resume,
                progress=None if as_json else _byte_progress(),
            )
        info = {
            "path": str(result.path),
            "sha256": result.sha256,
            "size_bytes": result.size_bytes,
            "resumed_from": result.resumed_from,
        }
        if as_json:
            _print_json(info)
        else:
            resumed = f", resumed at byte {result.resumed_from}" if result.resumed_from else ""
            out.print(
                f"saved {result.path} ({result.size_bytes} bytes{resumed}); "
                f"sha256 {result.sha256} verified"
            )


def _byte_progress() -> Callable[[int, int | None], None]:
    """A throttled stderr byte counter (no live display: downloads are usually short)."""
    state = {"last": 0}

    def report(done: int, total: int | None) -> None:
        if done - state["last"] >= 16 * 1024 * 1024 or (total is not None and done == total):
            state["last"] = done
            err.print(f"  {human_size(done)}" + (f" of {human_size(total)}" if total else ""))

    return report


# -- audit ----------------------------------------------------------------------------------
def _register_audit(app: typer.Typer) -> None:
    audit = command_group(app, "audit", "The hash-chained audit log.")
    # The admin module may own an offline `audit verify`; the HTTP variant then gets its
    # own name instead of shadowing it.
    verify_name = "verify-remote" if _has_command(audit, "verify") else "verify"
    log_name = "log-remote" if _has_command(audit, "log") else "log"

    @audit.command(verify_name)
    def verify_remote(
        url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False
    ) -> None:
        """Ask the service to verify the audit hash chain (non-zero exit if it is broken)."""
        with _api(url, api_key) as api:
            result = api.verify_audit()
        if as_json:
            _print_json(result)
        elif result.get("ok"):
            out.print(
                f"[green]audit chain intact[/]: {result.get('checked')} events, "
                f"head {result.get('head_hash')}"
            )
        else:
            err.print(f"[red]audit chain broken[/] at seq {result.get('first_bad_seq')}")
        if not result.get("ok"):
            raise typer.Exit(1)

    @audit.command(log_name)
    def log(
        subject_type: Annotated[
            str | None, typer.Option(help="Filter by subject type (dataset, job, ...).")
        ] = None,
        subject_id: Annotated[str | None, typer.Option(help="Filter by subject id.")] = None,
        action: Annotated[str | None, typer.Option(help="Filter by action.")] = None,
        limit: Annotated[int, typer.Option(help="At most this many events.")] = 100,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Page through the audit log over HTTP."""
        with _api(url, api_key) as api:
            items: list[dict[str, Any]] = []
            cursor = None
            while len(items) < limit:
                page = api.list_audit(
                    subject_type=subject_type,
                    subject_id=subject_id,
                    action=action,
                    cursor=cursor,
                    limit=min(100, limit - len(items)),
                )
                items.extend(page.get("items", []))
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        if as_json:
            _print_json(items)
        else:
            _table(
                items,
                ["seq", "time", "actor", "action", "subject_type", "subject_id"],
                "audit events",
            )
