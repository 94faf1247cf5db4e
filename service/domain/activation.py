"""Making a version active: the one path shared by the worker's save step and `promote`.

In the caller's transaction (model row locked), `activate` marks the request's records
forgotten, supersedes the parent and makes the version active, with a `records.forgotten`
event. After the commit, `after_activation` purges the records' content from the dataset
store and retires superseded checkpoints that are due. Both follow-ups are idempotent: if
they fail here the reaper finishes them (worker.reaper).

The service must not import the worker, so this lives on the service side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from service.domain.forgetting import append_forgotten_event, mark_forgotten
from service.domain.lifecycle import activate_version
from service.settings import Settings
from service.storage.objects import Storage
from service.storage.tables import ModelVersion
from service.trust import purge, retention
from service.trust.purge import PurgeResult

log = logging.getLogger("lethe.activation")


class RecordsUnavailable(Exception):
    """Some of the records were no longer present: activating would forget too little."""

    def __init__(self, marked: int, requested: int) -> None:
        super().__init__(f"only {marked} of {requested} records were still present")
        self.marked, self.requested = marked, requested


def activate(
    session: Session,
    version: ModelVersion,
    parent: ModelVersion,
    *,
    dataset_id: str,
    keys: Sequence[str],
    job_id: str,
    request_id: str,
    actor: str,
    now: datetime,
    served: Sequence[tuple[str, str]] = (),
) -> int:
    """`version` becomes active and `parent` superseded; the records are forgotten. Raises
    RecordsUnavailable (the caller rolls back) if any of them was already gone. ``served``:
    (job id, request id) of each request a coalesced run answered (the audit names them)."""
    marked = mark_forgotten(session, dataset_id, keys, job_id, now)
    if marked != len(set(keys)):
        raise RecordsUnavailable(marked, len(keys))
    activate_version(session, version, parent)
    parent.superseded_at = now
    append_forgotten_event(
        session,
        actor=actor,
        dataset_id=dataset_id,
        job_id=job_id,
        request_id=request_id,
        keys=keys,
        count=marked,
        served=served,
    )
    return marked


def after_activation(
    factory: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    *,
    model_id: str,
    dataset_id: str,
    actor: str,
) -> PurgeResult | None:
    """Purge the forgotten records' content, then retire due checkpoints (best effort); the
    purge's result, None if it failed."""
    result: PurgeResult | None = None
    try:  # looked up at call time so tests can make the store fail
        result = purge.purge_dataset(factory, storage, dataset_id, actor=actor)
    except Exception as exc:
        log.warning("dataset %s: purge failed (%s); the reaper will retry", dataset_id, exc)
    try:
        retention.retire_due(factory, storage, settings, actor=actor, model_id=model_id)
    except Exception as exc:
        log.warning("model %s: retiring superseded checkpoints failed: %s", model_id, exc)
    return result
