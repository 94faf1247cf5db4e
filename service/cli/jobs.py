"""`lethe forget` and `lethe jobs ...`: submit a deletion request, follow and show its job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.api_client import DEFAULT_URL, LetheClient
from service.cli.client import (
    JsonOpt,
    KeyOpt,
    UrlOpt,
    _api,
    _kv,
    _print_json,
    _table,
    err,
    out,
    read_keys_file,
)
from service.cli.common import command_group
from service.domain.states import JobStatus


# -- forget ---------------------------------------------------------------------------------
def register_forget(app: typer.Typer) -> None:
    @app.command("forget")
    def forget(
        model: Annotated[str, typer.Option(help="Model name.")],
        dataset: Annotated[str, typer.Option(help="Dataset id holding the records.")],
        keys_file: Annotated[Path, typer.Option(help="Record keys: one a line, or JSON array.")],
        method: Annotated[str, typer.Option(help="imu | ga")] = "imu",
        params: Annotated[str, typer.Option(help="Method parameters as JSON.")] = "{}",
        subject_ref: Annotated[
            str | None, typer.Option(help="Your reference for the person.")
        ] = None,
        reason: Annotated[str | None, typer.Option()] = None,
        idempotency_key: Annotated[
            str | None, typer.Option(help="Makes a retried submission return the first answer.")
        ] = None,
        wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Ask the service to make MODEL forget the records named in KEYS_FILE."""
        keys = read_keys_file(keys_file)
        if not keys:
            raise typer.BadParameter("no record keys in the file", param_hint="--keys-file")
        with _api(url, api_key) as api:
            req = api.submit_deletion(
                model,
                dataset,
                keys,
                method=method,
                params=json.loads(params),
                subject_ref=subject_ref,
                reason=reason,
                idempotency_key=idempotency_key,
            )
            job_id = str((req.get("job") or {}).get("id"))
            if not wait:
                if as_json:
                    _print_json(req)
                else:
                    out.print(
                        f"deletion request {req.get('id')} accepted; job {job_id} "
                        f"{(req.get('job') or {}).get('status')}"
                    )
                return
            job = _follow(api, job_id, quiet=as_json)
        if as_json:
            _print_json({**req, "job": job})
        else:
            _print_job_summary(job)
        _exit_for(job)


def _follow(
    api: LetheClient, job_id: str, *, quiet: bool = False, poll_interval: float = 0.5
) -> dict[str, Any]:
    if quiet:
        return api.wait_for_job(job_id, poll_interval=poll_interval)
    from service.cli.progress import JobProgress

    with JobProgress(err, title=f"job {job_id[:8]}") as bars:
        return api.wait_for_job(job_id, poll_interval=poll_interval, on_update=bars.update)


def _print_job_summary(job: dict[str, Any]) -> None:
    status = job.get("status")
    colours: dict[str, str] = {
        JobStatus.SUCCEEDED: "green",
        JobStatus.FAILED: "red",
        JobStatus.CANCELLED: "yellow",
    }
    colour = colours.get(str(status), "")
    out.print(
        f"job {job.get('id')}: [bold {colour}]{status}[/]"
        + (f" -> version {job.get('result_version_id')}" if job.get("result_version_id") else "")
    )
    error = job.get("error")
    if error:
        err.print(f"[red]{error.get('title', 'error')}[/]: {error.get('detail', '')}")


def _exit_for(job: dict[str, Any]) -> None:
    if job.get("status") != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


# -- jobs -----------------------------------------------------------------------------------
def register_jobs(app: typer.Typer) -> None:
    jobs = command_group(app, "jobs", "Follow and cancel unlearning jobs.")

    @jobs.command("list")
    def list_(
        status: Annotated[str | None, typer.Option(help="Filter by status.")] = None,
        model: Annotated[str | None, typer.Option(help="Filter by model name.")] = None,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """List jobs."""
        with _api(url, api_key) as api:
            items = list(api.iter_jobs(status=status, model=model))
        if as_json:
            _print_json(items)
        else:
            _table(items, ["id", "status", "phase", "progress", "attempts", "created_at"], "jobs")

    @jobs.command("show")
    def show(
        job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False
    ) -> None:
        """Show one job: status, phase, progress, metrics, result version."""
        with _api(url, api_key) as api:
            job = api.get_job(job_id)
        if as_json:
            _print_json(job)
        else:
            _kv(job, f"job {job_id}")

    @jobs.command("watch")
    def watch(
        job_id: str,
        interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 0.5,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Follow a job with a bar per phase until it ends (exit non-zero unless it succeeds)."""
        with _api(url, api_key) as api:
            job = _follow(api, job_id, quiet=as_json, poll_interval=interval)
        if as_json:
            _print_json(job)
        else:
            _print_job_summary(job)
        _exit_for(job)

    @jobs.command("cancel")
    def cancel(
        job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "", as_json: JsonOpt = False
    ) -> None:
        """Cancel a queued or running job."""
        with _api(url, api_key) as api:
            answer = api.cancel_job(job_id)
        if as_json:
            _print_json(answer)
        else:
            out.print(f"cancel requested for job {job_id}: {(answer or {}).get('status', 'ok')}")
