"""Coalescing: one run serves the queued requests of a model that can share it.

A burst of small requests for one model (one person's records each) would otherwise be as
many sequential runs and versions. When a job starts, it takes in the queued jobs behind it
that ask for the same thing (same dataset, method and params, no human review asked for,
records disjoint from the run's, not a whole class) until the run holds
`LETHE_COALESCE_MAX_RECORDS` records (`LETHE_COALESCE_MAX_RECORDS_EXACT` for a run that
retrains at once: worker.routing.record_bound). The served jobs move to `running` with
`served_by_job_id` naming the run's job; the run forgets the union (one IMU run, or one
retrain when it escalates) and each request keeps its own id, idempotency, evidence (its own
records judged alone: worker.imu.membership_parts), status and receipt naming the shared
version. Whole-class requests run alone: a union with other records is not a class.

If the run does not succeed (failure, cancel, retry, a lost worker), the served jobs go back
to the queue (worker.job_queue.release_members) and run on their own terms. A served job
whose cancel is asked while it is served makes the run start again without it (no attempt
spent): its records must not be forgotten under a cancelled request.

`LETHE_COALESCE_WINDOW_S` lets a job wait for companions before it starts: fewer runs, but
the first request's answer comes later by up to the window. The default (0) never delays a
request; requests that arrive while a run is going share the next run anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.domain.lifecycle import move_job, move_request
from service.domain.states import JobStatus, RequestStatus
from service.storage.tables import DeletionRequest, Job, utcnow
from service.trust.audit import append_events
from worker.errors import LeaseLost
from worker.imu.canonical import canonical_json
from worker.job_queue import Fence, finish_job, lock_claimed

MAX_CANDIDATES = 5000  # queued jobs looked at per run (the record budget stops it sooner)


@dataclass(frozen=True)
class Member:
    """A job served by the run, with its request and the records it named."""

    job_id: str
    request_id: str
    keys: tuple[str, ...]


class MembersChanged(Exception):
    """A served job's cancel was asked (or it left the run) while the run was going."""


def wait_for_companions(created_at: datetime, window_s: float, check: Callable[[], None]) -> None:
    """Sleep until the window after the request's arrival has passed (``check`` stops it)."""
    deadline = time.monotonic() + window_s - (utcnow() - created_at).total_seconds()
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
        check()


def absorb(
    session: Session,
    fence: Fence,
    *,
    dataset_id: str,
    keys: Sequence[str],
    max_records: int,
    whole_class: Callable[[Sequence[str]], bool],
    actor: str,
) -> list[Member]:
    """Take in the queued jobs that can share this run; in the caller's transaction."""
    leader = lock_claimed(session, fence)
    if leader is None:
        raise LeaseLost(f"job {fence.job_id}: claim lost before coalescing")
    params = canonical_json(leader.params or {})
    if (leader.params or {}).get("policy", {}).get("require_review"):
        return []
    budget = max_records - len(keys)
    taken = set(keys)
    rows = session.execute(
        select(Job, DeletionRequest)
        .join(DeletionRequest, DeletionRequest.id == Job.request_id)
        .where(
            Job.model_id == leader.model_id,
            Job.status == JobStatus.QUEUED,
            Job.served_by_job_id.is_(None),
            Job.cancel_requested.is_(False),
            Job.submitted_seq > leader.submitted_seq,
            Job.method == leader.method,
            DeletionRequest.dataset_id == dataset_id,
        )
        .order_by(Job.submitted_seq)
        .limit(MAX_CANDIDATES)
        .with_for_update(of=Job)
    ).all()
    members: list[Member] = []
    events: list[dict[str, Any]] = []
    now = utcnow()
    for job, request in rows:
        named = [str(k) for k in request.record_keys]
        if budget <= 0:
            break
        if len(named) > budget or canonical_json(job.params or {}) != params:
            continue
        if taken.intersection(named) or whole_class(named):
            continue
        move_job(job, JobStatus.RUNNING)
        move_request(request, RequestStatus.RUNNING)
        job.served_by_job_id = leader.id
        job.worker_id, job.device = leader.worker_id, leader.device
        job.source_version_id = leader.source_version_id
        job.started_at, job.phase, job.progress = now, leader.phase, 0.0
        events.append(
            {
                "actor": actor,
                "action": "job.coalesced",
                "subject_type": "job",
                "subject_id": job.id,
                "payload": {
                    "served_by": leader.id,
                    "request_id": request.id,
                    "records": len(named),
                },
            }
        )
        members.append(Member(job.id, request.id, tuple(named)))
        taken.update(named)
        budget -= len(named)
    append_events(session, events)
    return members


def served_jobs(session: Session, leader_id: str, members: Sequence[Member]) -> list[Job]:
    """The served jobs, locked; MembersChanged if any left the run or asked to cancel."""
    # Their requests come along (with_for_update of the jobs only): finishing reads them.
    # The session's identity map holds objects weakly, so the requests are kept alive in
    # session.info until the transaction ends; dropped, each finish re-read its request
    # (one SELECT per served job: 0.6 s of a 333-request run).
    rows = session.execute(
        select(Job, DeletionRequest)
        .join(DeletionRequest, DeletionRequest.id == Job.request_id)
        .where(Job.served_by_job_id == leader_id)
        .with_for_update(of=Job)
        .execution_options(populate_existing=True)
    ).all()
    session.info["lethe_served_requests"] = [request for _job, request in rows]
    jobs = {job.id: job for job, _request in rows}
    for m in members:
        job = jobs.get(m.job_id)
        if job is None or job.status != JobStatus.RUNNING or job.cancel_requested:
            raise MembersChanged(f"job {m.job_id} left the run or asked to be cancelled")
    return [jobs[m.job_id] for m in members]


def finish_served(
    session: Session,
    jobs: Sequence[Job],
    *,
    leader_id: str,
    version_id: str,
    metrics_of: Callable[[int], dict[str, Any]],
    request_status: RequestStatus,
    actor: str,
) -> None:
    """The served jobs succeed with the run's version, each with its own metrics."""
    events: list[dict[str, Any]] = []
    for i, job in enumerate(jobs):
        job.result_version_id = version_id
        job.metrics = metrics_of(i)
        job.progress = 1.0
        job.error = None
        finish_job(
            session,
            job,
            JobStatus.SUCCEEDED,
            actor=actor,
            request_status=request_status,
            payload={"result_version_id": version_id, "served_by": leader_id},
            events=events,
        )
    append_events(session, events)


# Run-wide detail that only the run's own job keeps: copying it to each served job made a
# burst of 1,000 requests write ~100 KB per job (kept-key hashes, per-record z of the union).
_RUN_ONLY_STATS = ("kept_key_sha256", "loss_per_epoch", "forget_loss_per_epoch")


def _served_stats(stats: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in stats.items() if k not in _RUN_ONLY_STATS}
    escalated = out.get("escalated_from")
    if isinstance(escalated, dict) and isinstance(escalated.get("stats"), dict):
        out["escalated_from"] = {**escalated, "stats": _served_stats(escalated["stats"])}
    return out


def own_metrics(metrics: dict[str, Any], index: int) -> dict[str, Any]:
    """A served request's metrics: the run's, with its own records' evidence (``index`` in
    the run's parts, the run's own request first) as its membership. A served job (index
    >= 1) gets the run's summary; the run's job keeps the per-record and per-key lists."""
    out = dict(metrics)
    for side in ("before", "after"):
        values = dict(metrics.get(side) or {})
        parts = values.pop("membership_parts", None)
        if parts is not None:
            run = values.get("membership")
            if index and isinstance(run, dict):
                run = {k: v for k, v in run.items() if k != "per_record_z"}
            values["run_membership"] = run
            values["membership"] = parts[index]
        out[side] = values
    if index:
        if isinstance(metrics.get("influence"), dict):
            out["influence"] = _served_stats(metrics["influence"])
        if isinstance(metrics.get("coalesced"), dict):
            coalesced = {k: v for k, v in metrics["coalesced"].items() if k != "job_ids"}
            coalesced["run_job_id"] = (metrics["coalesced"].get("job_ids") or [None])[0]
            out["coalesced"] = coalesced
    return out


def run_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The version's metrics: the union's evidence, each part's without its per-record z
    (every request's job keeps its own)."""
    out = dict(metrics)
    for side in ("before", "after"):
        values = dict(metrics.get(side) or {})
        if values.get("membership_parts") is not None:
            values["membership_parts"] = [
                None if p is None else {k: v for k, v in p.items() if k != "per_record_z"}
                for p in values["membership_parts"]
            ]
        out[side] = values
    return out


__all__ = [
    "Member",
    "MembersChanged",
    "absorb",
    "finish_served",
    "own_metrics",
    "run_metrics",
    "served_jobs",
    "wait_for_companions",
]
