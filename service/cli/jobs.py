"""`lethe forget` and `lethe jobs ...`: submit a deletion request, follow and show its job."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from service.cli.api_client import DEFAULT_URL, LetheClient
from service.cli.client_commands import (
    JsonOpt,
    KeyOpt,
    UrlOpt,
    _api,
    _print_json,
    _table,
    answer,
    read_keys_file,
)
from service.cli.common import command_group
from service.cli.render import err, forgetting_lines, kv, metrics_table, out, policy_table
from service.domain.states import JobStatus, RequestStatus

# -- forget ---------------------------------------------------------------------------------
# `lethe forget --wait` ends with the request's final state; each has its own exit status
# (1 is an API error, 2 a usage error, 3 an unreachable server, 4 a checksum mismatch).
EXIT_CODES: dict[str, int] = {
    RequestStatus.COMPLETED: 0,
    RequestStatus.NEEDS_REVIEW: 5,
    RequestStatus.FAILED: 6,
    RequestStatus.CANCELLED: 7,
    RequestStatus.REJECTED: 8,
}
FORGET_EPILOG = (
    "With --wait the exit status says how the request ended: 0 completed (a version without "
    "the records is active), 5 needs_review (held by the release policy: promote or reject "
    "it), 6 failed, 7 cancelled, 8 rejected; 1 API error, 3 server unreachable."
)


def params_help() -> str:
    """The accepted `--params` keys with their descriptions, ranges and defaults, from the
    API's param models (they import the engine). A setting the methods share is listed once."""
    from rich.markup import escape

    from service.domain.params import PolicyOverrides, param_models

    def entries(method: str) -> dict[str, str]:
        fields = param_models()[method].model_fields
        return {k: f"{k}: {f.description}" for k, f in fields.items() if k != "policy"}

    imu, ga, lm = entries("imu"), entries("ga"), entries("lm")
    both = {k: v for k, v in imu.items() if ga.get(k) == v}
    listed = {*imu.values(), *ga.values()}
    groups = [
        ("imu and ga", list(both.values())),
        ("imu only", [v for k, v in imu.items() if k not in both]),
        ("ga only", [v for k, v in ga.items() if k not in both]),
        (
            "causal_lm models (either method), besides the shared ones above",
            [v for v in lm.values() if v not in listed],
        ),
    ]
    paragraphs = ["Method settings as a JSON object, all optional (null keeps the default)."]
    for title, items in groups:
        paragraphs += [f"{title}:", *(f"• {item}" for item in items)]
    paragraphs.append(
        "policy (release-policy overrides, an object): " + ", ".join(PolicyOverrides.model_fields)
    )
    # Typer renders help as rich markup: a bracketed range must stay text.
    return "\n\n".join(escape(p) for p in paragraphs)


class ForgetCommand(TyperCommand):
    """Fills in the `--params` help only when help is shown: listing the keys imports the
    engine (torch, seconds), which no other use of the command needs."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            if param.name == "params" and hasattr(param, "help"):
                param.help = params_help()
        super().format_help(ctx, formatter)


def register_forget(app: typer.Typer) -> None:
    @app.command("forget", cls=ForgetCommand, epilog=FORGET_EPILOG)
    def forget(
        model: Annotated[str, typer.Option(help="Name of the model that must forget.")],
        dataset: Annotated[
            str, typer.Option(help="Id (or unique name) of the train dataset holding the records.")
        ],
        keys_file: Annotated[
            Path,
            typer.Option(
                help="File of record keys: one a line (# comments) or a JSON array; - for stdin."
            ),
        ],
        method: Annotated[
            str, typer.Option(help="imu (influence-guided, default) or ga (gradient ascent).")
        ] = "imu",
        params: Annotated[str, typer.Option(help="Method settings as a JSON object.")] = "{}",
        subject_ref: Annotated[
            str | None, typer.Option(help="Your reference for the person (ticket id, ...).")
        ] = None,
        reason: Annotated[
            str | None, typer.Option(help="Why the records must go (kept with the request).")
        ] = None,
        idempotency_key: Annotated[
            str | None, typer.Option(help="Makes a retried submission return the first answer.")
        ] = None,
        wait: Annotated[
            bool,
            typer.Option("--wait", help="Follow the job, then end with the request's final state."),
        ] = False,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Ask the service to make MODEL forget the records named in KEYS_FILE."""
        keys = read_keys_file(keys_file)
        if not keys:
            raise typer.BadParameter("no record keys in the file", param_hint="--keys-file")
        try:
            settings = json.loads(params)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc.msg}", param_hint="--params") from None
        with _api(url, api_key) as api:
            req = api.submit_deletion(
                model,
                dataset,
                keys,
                method=method,
                params=settings,
                subject_ref=subject_ref,
                reason=reason,
                idempotency_key=idempotency_key,
            )
            if not wait:
                if as_json:
                    _print_json(req)
                else:
                    job = req.get("job") or {}
                    out.print(
                        f"deletion request {req.get('id')} accepted; job {job.get('id')} "
                        f"{job.get('status')}"
                    )
                return
            final = _follow_request(api, str(req.get("id")), quiet=as_json)
        if as_json:
            _print_json(final)
        else:
            print_request_outcome(final)
        raise typer.Exit(EXIT_CODES.get(str(final.get("status")), 1))


def _follow_request(api: LetheClient, request_id: str, *, quiet: bool) -> dict[str, Any]:
    if quiet:
        return api.wait_for_request(request_id)
    from service.cli.progress import JobProgress

    with JobProgress(
        err, title=f"request {request_id}", recipe_epochs=lambda m: _recipe_epochs(api, m)
    ) as bars:
        return api.wait_for_request(request_id, on_update=bars.update)


def _recipe_epochs(api: LetheClient, model: str) -> int | None:
    value = (api.get_model(model).get("recipe") or {}).get("epochs")
    return value if isinstance(value, int) else None


def print_request_outcome(request: dict[str, Any]) -> None:
    """The request's final state, its result version and, when held, why and what to do."""
    status = str(request.get("status"))
    colours: dict[str, str] = {
        RequestStatus.COMPLETED: "green",
        RequestStatus.NEEDS_REVIEW: "yellow",
        RequestStatus.CANCELLED: "yellow",
    }
    colour = colours.get(status, "red")
    version = request.get("result_version") or {}
    job = request.get("job") or {}
    line = f"deletion request {request.get('id')}: [bold {colour}]{status}[/]"
    if version:
        line += f"; version {version.get('number')} {version.get('id')} is {version.get('status')}"
    out.print(line)
    error = job.get("error")
    if error:
        err.print(f"[red]{error.get('title', 'error')}[/]: {error.get('detail', '')}")
    forgetting_lines(request)
    if status == RequestStatus.NEEDS_REVIEW:
        policy_table(request.get("policy"))
        out.print(
            f"review it: lethe versions promote {version.get('id')}   "
            f"or: lethe versions reject {version.get('id')}"
        )


def _follow(
    api: LetheClient, job_id: str, *, quiet: bool = False, poll_interval: float = 0.5
) -> dict[str, Any]:
    if quiet:
        return api.wait_for_job(job_id, poll_interval=poll_interval)
    from service.cli.progress import JobProgress

    with JobProgress(
        err, title=f"job {job_id}", recipe_epochs=lambda m: _recipe_epochs(api, m)
    ) as bars:
        return api.wait_for_job(job_id, poll_interval=poll_interval, on_update=bars.update)


def _print_job_summary(job: dict[str, Any]) -> None:
    status = job.get("status")
    colours: dict[str, str] = {
        JobStatus.SUCCEEDED: "green",
        JobStatus.FAILED: "red",
        JobStatus.CANCELLED: "yellow",
    }
    colour = colours.get(str(status), "")
    version = ""
    if job.get("result_version_id"):
        version = f" -> version {job['result_version_id']} ({job.get('result_version_status')})"
    out.print(f"job {job.get('id')}: [bold {colour}]{status}[/]{version}")
    error = job.get("error")
    if error:
        err.print(f"[red]{error.get('title', 'error')}[/]: {error.get('detail', '')}")


def show_job(job: dict[str, Any]) -> None:
    """Scalars as a table; metrics and the policy decision as their own small tables."""
    skip = ("metrics", "policy", "params", "timings", "error")
    kv({k: v for k, v in job.items() if k not in skip}, f"job {job.get('id')}")
    if job.get("params"):
        out.print("params: " + json.dumps(job["params"]), markup=False)
    timings = job.get("timings") or {}
    if timings:
        out.print(
            "seconds per phase: "
            + ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if isinstance(v, int | float))
        )
    metrics_table(job.get("metrics"))
    policy_table(job.get("policy"))
    if job.get("error"):
        err.print(json.dumps(job["error"], indent=2), markup=False)


def _exit_for(job: dict[str, Any]) -> None:
    if job.get("status") != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


# -- jobs -----------------------------------------------------------------------------------
def register_jobs(app: typer.Typer) -> None:
    jobs = command_group(app, "jobs", "Follow and cancel unlearning jobs.")

    @jobs.command("list")
    def list_(
        status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this status.")] = None,
        model: Annotated[str | None, typer.Option(help="Only jobs of this model (name).")] = None,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """List jobs."""
        columns = ["id", "status", "phase", "progress", "result_version_status", "created_at"]
        answer(
            url,
            api_key,
            as_json,
            lambda api: list(api.iter_jobs(status=status, model=model)),
            lambda items: _table(items, columns, "jobs"),
        )

    @jobs.command("show")
    def show(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Show one job: status, phase, progress, metrics, result version."""
        answer(url, api_key, as_json, lambda api: api.get_job(job_id), show_job)

    @jobs.command("watch")
    def watch(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 0.5,
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Follow a job with a bar per phase until it ends (exit non-zero unless it succeeds)."""
        follow = partial(_follow, job_id=job_id, quiet=as_json, poll_interval=interval)
        _exit_for(answer(url, api_key, as_json, follow, _print_job_summary))

    @jobs.command("cancel")
    def cancel(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        url: UrlOpt = DEFAULT_URL,
        api_key: KeyOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Cancel a queued or running job."""
        answer(
            url,
            api_key,
            as_json,
            lambda api: api.cancel_job(job_id),
            lambda job: out.print(
                f"cancel requested for job {job_id}: {(job or {}).get('status', 'ok')}"
            ),
        )
