"""The saving phase: write the checkpoint, then create the version in one transaction.

Exactly-once result. The checkpoint goes to a key derived from the job id and attempt
(`checkpoints/<model>/job-<job>-a<attempt>.safetensors`, written to a temp name and renamed);
then ONE transaction, fenced on the claim, creates version n+1 and, by the release policy
(service.trust.policy), either activates it (service.domain.activation: supersedes n, marks the
records forgotten, request completed) or keeps it a candidate (request needs_review),
finishes the job and appends the audit events. The unique constraint on ModelVersion.job_id
backs this up. If the transaction fails the caller deletes the file; files of attempts that
died before committing are deleted when the job ends. After an activating commit the shared
`after_activation` purges the records' content and retires due checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from service.domain.activation import RecordsUnavailable, activate, after_activation
from service.domain.models import active_version
from service.domain.states import JobStatus, Phase, RequestStatus, VersionStatus
from service.storage.db import transaction
from service.storage.objects import Storage
from service.storage.tables import Dataset, ModelVersion, utcnow
from service.trust.audit import append_version_event
from worker.coalescing import finish_served, own_metrics, run_metrics, served_jobs
from worker.context import RunnerContext
from worker.dataset_cache import DATASETS
from worker.errors import Cancelled, JobError, LeaseLost, SourceChanged
from worker.job_queue import Fence, finish_job, lock_claimed
from worker.loading import Loaded


@dataclass(frozen=True)
class StoredCheckpoint:
    key: str
    sha256: str
    size: int


def write_checkpoint(storage: Storage, key: str, job_id: str, model: Any) -> StoredCheckpoint:
    from worker.imu.checkpoints import to_bytes

    data = to_bytes(model, metadata={"lethe_job_id": job_id})
    sha, size = storage.write_bytes(key, data)
    return StoredCheckpoint(key, sha, size)


def commit_version(
    ctx: RunnerContext,
    fence: Fence,
    loaded: Loaded,
    stored: StoredCheckpoint,
    metrics: dict[str, Any],
    timings: dict[str, float],
) -> str:
    """Create the version (active or candidate) and finish the job; the version id."""
    actor = ctx.actor
    status = VersionStatus(metrics["policy"]["decision"])  # active | candidate
    with transaction(ctx.session_factory) as session:
        job = lock_claimed(session, fence)
        if job is None:
            raise LeaseLost(f"job {fence.job_id}: claim lost before saving")
        if job.cancel_requested:
            raise Cancelled()
        served = served_jobs(session, job.id, loaded.served) if loaded.served else []
        source = active_version(session, fence.model_id)
        if source is None or source.id != loaded.source_version_id:
            raise SourceChanged(
                f"the model's active version changed from {loaded.source_version_id} "
                f"to {source.id if source else None} while the job ran"
            )
        number = (
            session.execute(
                select(func.max(ModelVersion.number)).where(ModelVersion.model_id == fence.model_id)
            ).scalar_one()
            or 0
        ) + 1
        now = utcnow()
        version = ModelVersion(
            model_id=fence.model_id,
            number=number,
            parent_id=source.id,
            job_id=job.id,
            storage_key=stored.key,
            sha256=stored.sha256,
            size_bytes=stored.size,
            status=VersionStatus.CANDIDATE,
            metrics=run_metrics(metrics),
            created_at=now,
        )  # a release moves it to active below, after its parent steps down
        session.add(version)
        session.flush()  # the unique job_id constraint fires here, inside the transaction
        job.result_version_id = version.id
        job.metrics = own_metrics(metrics, 0) if served else metrics
        job.timings = {k: round(v, 6) for k, v in timings.items()}
        job.phase = Phase.SAVING
        job.progress = 1.0
        job.error = None
        active = status == VersionStatus.ACTIVE
        request_status = RequestStatus.COMPLETED if active else RequestStatus.NEEDS_REVIEW
        finish_served(
            session,
            served,
            leader_id=job.id,
            version_id=version.id,
            metrics_of=lambda i: own_metrics(metrics, i + 1),
            request_status=request_status,
            actor=actor,
        )
        answered = [(job.id, job.request_id), *((j.id, j.request_id) for j in served)]
        finish_job(
            session,
            job,
            JobStatus.SUCCEEDED,
            actor=actor,
            payload={
                "result_version_id": version.id,
                "worker_id": ctx.worker_id,
                "decision": status,
            },
            request_status=request_status,
        )
        coalesced = (
            {"job_ids": [a for a, _ in answered], "request_ids": [b for _, b in answered]}
            if served
            else {}
        )
        append_version_event(
            session,
            version,
            actor=actor,
            action="version.created",
            parent_id=source.id,
            job_id=job.id,
            request_id=job.request_id,
            **coalesced,
            size_bytes=stored.size,
            status=status,
            superseded_id=source.id if active else None,
            policy={"failed": metrics["policy"]["failed"], "mode": metrics["policy"]["mode"]},
            forgetting=metrics.get("forgetting"),
            attempts=metrics.get("attempts") or [],
        )
        if active:
            try:
                activate(
                    session,
                    version,
                    source,
                    dataset_id=loaded.dataset_id,
                    keys=loaded.keys,
                    job_id=job.id,
                    request_id=job.request_id,
                    actor=actor,
                    now=now,
                    served=answered if served else (),
                )
            except RecordsUnavailable as exc:
                raise JobError(
                    "records-unavailable",
                    "Records unavailable",
                    f"only {exc.marked} of {exc.requested} records were still present at save",
                ) from None
        return version.id


def finish_activation(
    ctx: RunnerContext, model_id: str, dataset_id: str, forgotten: Sequence[str]
) -> None:
    """Post-commit upkeep of an activating save. The process's parsed copy of the dataset
    follows the purge: the forgotten rows dropped from it, or (if it does not add up) gone."""
    result = after_activation(
        ctx.session_factory,
        ctx.storage,
        ctx.settings,
        model_id=model_id,
        dataset_id=dataset_id,
        actor=ctx.actor,
    )
    if result is None or not result.new_key:
        return
    with ctx.session_factory() as session:
        dataset = session.get(Dataset, dataset_id)
        sha = dataset.content_sha256 if dataset is not None else None
    carried = (
        bool(sha)
        and result.old_key is not None
        and DATASETS.carry_over(
            result.old_key, result.new_key, str(sha), set(forgotten), result.rows_removed
        )
    )
    if not carried:
        DATASETS.evict_other_files(result.new_key)
