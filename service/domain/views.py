"""The JSON shapes of the API resources (one function per resource, used by every router)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row

from service import engine
from service.storage.tables import Dataset, DeletionRequest, Job, Model, ModelVersion


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def dataset_view(ds: Dataset) -> dict[str, Any]:
    return {
        "id": ds.id,
        "name": ds.name,
        "kind": ds.kind,
        "role": ds.role,
        "record_count": ds.record_count,
        "sha256": ds.sha256,
        "content_sha256": ds.content_sha256,  # of the current file (differs after a purge)
        "size_bytes": ds.size_bytes,
        "meta": ds.meta,
        "created_at": iso(ds.created_at),
    }


def version_view(v: ModelVersion, model_name: str) -> dict[str, Any]:
    return {
        "id": v.id,
        "model": model_name,
        "number": v.number,
        "parent_id": v.parent_id,
        "job_id": v.job_id,
        "status": v.status,
        "sha256": v.sha256,
        "size_bytes": v.size_bytes,
        "metrics": v.metrics,
        "created_at": iso(v.created_at),
        "superseded_at": iso(v.superseded_at),
        "retired_at": iso(v.retired_at),
        "checkpoint_available": v.storage_key is not None,
    }


def model_view(m: Model, active: ModelVersion | None) -> dict[str, Any]:
    return {
        "id": m.id,
        "name": m.name,
        "architecture": m.architecture,
        "arch_kwargs": m.arch_kwargs,
        "description": m.description,
        "eval_dataset_id": m.eval_dataset_id,
        "member_probe_dataset_id": m.member_probe_dataset_id,
        "recipe": m.recipe,
        "recipe_sha256": recipe_sha256(m.recipe),
        "created_at": iso(m.created_at),
        "active_version": version_view(active, m.name) if active is not None else None,
    }


def recipe_sha256(recipe: dict[str, Any] | None) -> str | None:
    """The identity receipts cite for a recipe (worker.imu.recipe.Recipe.sha256)."""
    if not recipe:
        return None
    return engine.recipe_sha256(recipe)


def policy_view(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The release policy's decision stored with a job's metrics (worker.saving), if any."""
    policy = (metrics or {}).get("policy")
    return policy if isinstance(policy, dict) and "decision" in policy else None


def evidence_view(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The per-record membership evidence before and after (ALGORITHM.md §6): the test, n,
    the statistic and its limit, the band, the false-release rate and each record's z (in
    the request's key order, or a seeded subset of it above 4096 records)."""
    metrics = metrics or {}
    after = (metrics.get("after") or {}).get("membership")
    if not isinstance(after, dict):
        return None
    before = (metrics.get("before") or {}).get("membership") or {}
    return {
        **after,
        "before": {k: before.get(k) for k in ("outcome", "statistic", "false_release_rate")},
    }


def job_view(
    job: Job | Row[Any], model_name: str | None = None, version_status: str | None = None
) -> dict[str, Any]:
    """From an ORM Job or a row of the jobs table's columns (same attribute names).

    `version_status` is the status of the job's result version (review state)."""
    return {
        "id": job.id,
        "request_id": job.request_id,
        "model": model_name,
        "method": job.method,
        "params": job.params,
        "status": job.status,
        "phase": job.phase,
        "progress": job.progress,
        "attempts": job.attempts,
        "error": job.error,
        "cancel_requested": job.cancel_requested,
        "source_version_id": job.source_version_id,
        "result_version_id": job.result_version_id,
        "served_by": job.served_by_job_id,
        "result_version_status": version_status if job.result_version_id else None,
        "policy": policy_view(job.metrics),
        "metrics": job.metrics,
        "timings": job.timings,
        "device": job.device,
        "submitted_seq": job.submitted_seq,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def accepted_view(request_id: str, status: str, job_id: str, job_status: str) -> dict[str, Any]:
    """The 202 answer of a submission (and of its replays): `{id, status, job: {id, status}}`."""
    return {"id": request_id, "status": status, "job": {"id": job_id, "status": job_status}}


def request_view(
    req: DeletionRequest,
    job: Job | None,
    model_name: str,
    *,
    result: ModelVersion | Row[Any] | None = None,
) -> dict[str, Any]:
    """`result` is the job's result version: its status and the policy decision are the
    request's review state (`needs_review` and why)."""
    job_part = job_view(job, model_name, result.status if result else None) if job else None
    metrics = (job.metrics or {}) if job is not None else None
    return {
        "id": req.id,
        "status": req.status,
        "job": job_part,
        "result_version": (
            {"id": result.id, "number": result.number, "status": result.status}
            if result is not None
            else None
        ),
        "policy": policy_view(job.metrics) if job is not None else None,
        "evidence": evidence_view(job.metrics) if job is not None else None,
        "forgetting": metrics.get("forgetting") if metrics is not None else None,
        "attempts": metrics.get("attempts") if metrics is not None else None,
        "model": model_name,
        "dataset": req.dataset_id,
        "record_keys": req.record_keys,
        "method": req.method,
        "params": req.params,
        "subject_ref": req.subject_ref,
        "reason": req.reason,
        "created_at": iso(req.created_at),
    }
