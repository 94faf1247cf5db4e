"""Retirement of checkpoints that may still hold forgotten data.

A superseded version's weights were trained on records a later version forgot, so its
checkpoint is deleted `LETHE_SUPERSEDED_RETENTION_S` seconds after it was superseded (0 = at
once: the save step and promotion call `retire_due` right after their commit; the worker's
reaper retires the rest on its periodic tick). A rejected candidate is retired at once. The
row stays with its sha256, metrics and lineage; `storage_key` becomes None, `retired_at` is
set, a `version.retired` event is appended and downloads answer 410 Gone. Active and
candidate versions are never retired, so a job can always start from the active version.

The file is deleted inside the transaction that marks the version retired, just before the
commit: if the delete fails nothing changes; if the commit fails the file is gone anyway and
the next sweep records it (deleting a missing file is a no-op).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.domain.states import VersionStatus
from service.settings import Settings
from service.storage.db import transaction
from service.storage.objects import Storage
from service.storage.tables import Model, ModelVersion, utcnow
from service.trust.audit import append_version_event

log = logging.getLogger("lethe.retention")

RETIRABLE = (VersionStatus.SUPERSEDED, VersionStatus.REJECTED)


def retire_version(
    session: Session, storage: Storage, version: ModelVersion, *, actor: str, reason: str
) -> str | None:
    """Delete the checkpoint of `version` inside the caller's transaction; the deleted key."""
    if version.status not in RETIRABLE:
        raise ValueError(
            f"version {version.id} is {version.status}; only "
            f"{' or '.join(RETIRABLE)} versions are retired"
        )
    key = version.storage_key
    if key is None:
        return None
    version.storage_key = None
    version.retired_at = utcnow()
    append_version_event(
        session,
        version,
        actor=actor,
        action="version.retired",
        status=version.status,
        reason=reason,
    )
    session.flush()
    storage.delete(key)
    return key


def due(version: ModelVersion, retention_s: float, now: datetime) -> bool:
    if version.storage_key is None or version.status not in RETIRABLE:
        return False
    if version.status == VersionStatus.REJECTED:
        return True
    since = version.superseded_at
    return since is None or since + timedelta(seconds=retention_s) <= now


def retire_due(
    factory: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    *,
    actor: str,
    model_id: str | None = None,
) -> list[str]:
    """Retire every superseded/rejected version whose retention has run out; their ids."""
    now = utcnow()
    with factory() as session:
        q = select(ModelVersion.id, ModelVersion.model_id).where(
            ModelVersion.storage_key.is_not(None), ModelVersion.status.in_(RETIRABLE)
        )
        if model_id is not None:
            q = q.where(ModelVersion.model_id == model_id)
        rows = session.execute(q).all()
    retired = []
    for row in rows:
        try:
            with transaction(factory) as session:
                # Same lock order as the worker's save step and promotion: model, then version.
                session.execute(select(Model.id).where(Model.id == row.model_id).with_for_update())
                version = session.execute(
                    select(ModelVersion)
                    .where(ModelVersion.id == row.id)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                ).scalar_one_or_none()
                if version is None or not due(version, settings.superseded_retention_s, now):
                    continue
                retire_version(
                    session,
                    storage,
                    version,
                    actor=actor,
                    reason=(
                        VersionStatus.REJECTED
                        if version.status == VersionStatus.REJECTED
                        else VersionStatus.SUPERSEDED
                    ),
                )
            retired.append(row.id)
        except Exception as exc:  # storage or database hiccup: the next sweep tries again
            log.warning("could not retire version %s: %s", row.id, exc)
    return retired
