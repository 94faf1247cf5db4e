"""Version lineage and the review decisions on candidates (promote, reject).

Ordering while a candidate waits for review: the model's active version does not change, so
later jobs of the model start from it (it still holds the candidate's records) and may make
a newer version active. The candidate is then stale: promoting it would resurrect what those
later jobs forgot, so promotion requires that the candidate's parent is still the active
version (409 `candidate-stale` otherwise); reject it and submit the request again. Keys named
by a request awaiting review cannot be named by another request meanwhile (422).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.domain.activation import RecordsUnavailable, activate, after_activation
from service.domain.lifecycle import move_request, move_version
from service.domain.models import active_version, get_version
from service.domain.states import RequestStatus, VersionStatus
from service.domain.views import iso, version_view
from service.errors import DomainError, conflict
from service.settings import Settings
from service.storage.db import transaction
from service.storage.objects import Storage
from service.storage.tables import DeletionRequest, Job, Model, ModelVersion, utcnow
from service.trust.audit import append_version_event
from service.trust.purge import key_sha256
from service.trust.retention import retire_version

MAX_LINEAGE = 10_000


def served_requests(session: Session, version: ModelVersion) -> list[tuple[Job, DeletionRequest]]:
    """Every (job, request) the version answers, the run's own first: a coalesced run
    (worker.coalescing) serves several requests with one version."""
    if version.job_id is None:
        return []
    rows = session.execute(
        select(Job, DeletionRequest)
        .join(DeletionRequest, DeletionRequest.id == Job.request_id)
        .where((Job.id == version.job_id) | (Job.served_by_job_id == version.job_id))
        .order_by(Job.id != version.job_id, Job.submitted_seq)
    ).all()
    return [(job, request) for job, request in rows]


def lineage_entry(session: Session, version: ModelVersion, model_name: str) -> dict[str, Any]:
    served = served_requests(session, version)
    request = served[0][1] if served else None
    entry = version_view(version, model_name)
    entry["deletion_request"] = None
    entry["record_key_sha256"] = []
    # A version's records are forgotten once it (or a descendant) became active.
    entry["records_forgotten"] = version.status in (
        VersionStatus.ACTIVE,
        VersionStatus.SUPERSEDED,
    ) and (request is not None)
    if request is not None:
        entry["deletion_request"] = {
            "id": request.id,
            "status": request.status,
            "method": request.method,
            "subject_ref": request.subject_ref,
            "reason": request.reason,
            "created_at": iso(request.created_at),
        }
        entry["record_key_sha256"] = [key_sha256(str(k)) for _, r in served for k in r.record_keys]
        entry["deletion_requests"] = [r.id for _, r in served]
    return entry


def lineage(factory: sessionmaker[Session], version_id: str) -> dict[str, Any]:
    """The chain from this version back to version 1, newest first."""
    with factory() as session:
        version, model = get_version(session, version_id)
        chain: list[dict[str, Any]] = []
        current: ModelVersion | None = version
        while current is not None and len(chain) < MAX_LINEAGE:
            chain.append(lineage_entry(session, current, model.name))
            current = session.get(ModelVersion, current.parent_id) if current.parent_id else None
        return {"version_id": version.id, "model": model.name, "versions": chain}


def _locked(session: Session, version_id: str) -> tuple[ModelVersion, Model]:
    version, model = get_version(session, version_id)
    # Lock order shared with the worker's save step: model row, then the versions.
    session.execute(select(Model.id).where(Model.id == model.id).with_for_update())
    locked = session.execute(
        select(ModelVersion)
        .where(ModelVersion.id == version_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    return locked, model


def _not_candidate(version: ModelVersion, action: str) -> DomainError:
    return conflict(
        "version-not-candidate",
        f"version {version.number} is {version.status}; only a candidate can be {action}",
        title="Not a candidate",
        version_status=version.status,
    )


def promote(
    factory: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    version_id: str,
    *,
    actor: str,
) -> dict[str, Any]:
    """candidate → active; the previous active version is superseded; the request's records
    are forgotten (then purged) and the request completed."""
    with transaction(factory) as session:
        version, model = _locked(session, version_id)
        if version.status != VersionStatus.CANDIDATE:
            raise _not_candidate(version, "promoted")
        current = active_version(session, model.id)
        if current is None or current.id != version.parent_id:
            raise conflict(
                "candidate-stale",
                f"version {version.number} was computed from a version that is no longer "
                "active; promoting it would bring back records forgotten since. Reject it and "
                "submit the deletion request again.",
                title="Candidate is stale",
                active_version_id=current.id if current else None,
            )
        served = served_requests(session, version)
        if not served:
            raise conflict("version-not-candidate", "the version has no deletion request")
        request = served[0][1]
        keys = [str(k) for _, r in served for k in r.record_keys]
        for _, r in served:
            move_request(r, RequestStatus.COMPLETED)
        append_version_event(
            session,
            version,
            actor=actor,
            action="version.promoted",
            superseded_id=current.id,
            request_id=request.id,
            request_ids=[r.id for _, r in served],
            job_id=version.job_id,
        )
        try:  # raising rolls the whole promotion back, its event included
            activate(
                session,
                version,
                current,
                dataset_id=request.dataset_id,
                keys=keys,
                job_id=version.job_id or "",
                request_id=request.id,
                actor=actor,
                now=utcnow(),
                served=[(j.id, r.id) for j, r in served] if len(served) > 1 else (),
            )
        except RecordsUnavailable as exc:
            raise conflict(
                "records-unavailable",
                f"only {exc.marked} of the request's {exc.requested} records are still "
                "present (another request forgot some meanwhile); reject this candidate",
                title="Records unavailable",
            ) from None
        dataset_id, model_id = request.dataset_id, model.id
    after_activation(
        factory, storage, settings, model_id=model_id, dataset_id=dataset_id, actor=actor
    )
    with factory() as session:
        version, model = get_version(session, version_id)
        return version_view(version, model.name)


def reject(
    factory: sessionmaker[Session], storage: Storage, version_id: str, *, actor: str
) -> dict[str, Any]:
    """candidate → rejected: its checkpoint is deleted, the request is `rejected` and its
    records stay present (they can be requested again)."""
    with transaction(factory) as session:
        version, model = _locked(session, version_id)
        if version.status != VersionStatus.CANDIDATE:
            raise _not_candidate(version, VersionStatus.REJECTED)
        served = served_requests(session, version)
        request = served[0][1] if served else None
        move_version(version, VersionStatus.REJECTED)
        for _, r in served:
            move_request(r, RequestStatus.REJECTED)
        append_version_event(
            session,
            version,
            actor=actor,
            action="version.rejected",
            request_id=request.id if request else None,
            request_ids=[r.id for _, r in served],
            job_id=version.job_id,
        )
        retire_version(session, storage, version, actor=actor, reason=VersionStatus.REJECTED)
        return version_view(version, model.name)
