"""Deletion requests: validation and idempotent submission.

Submission writes the request, its queued job (with the next position in the model's line)
and an audit event in one transaction and hands the job id to the queue only after the
commit, so an executor never sees a job that might still roll back.

Concurrency: under load, submissions waiting in one process share a transaction, each in its
own savepoint or none (service.storage.group_commit). Each reads the model, the dataset and
its records without locks; the batch's short final step then takes the locks, in one order
(datasets, models, the audit chain head), and writes everything: the requests, their record
holds, the jobs with their line positions (the model's `job_seq` counter) and the audit
events. A hold is written only where the record is still as its submission read it
(service.domain.record_holds): when another process held or forgot one in between, the batch
is rolled back and run again with the dataset locks taken first, so the "key already named
by a queued or running request" check sees every earlier submission. The locks are thus held
from the final step to the commit, not while submissions are validated, and batches of two
API processes overlap except there. The batch's first submission reads the records that all
of its submissions name in one statement (`batch_hints`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.domain.datasets import resolve_dataset
from service.domain.models import model_and_active_id
from service.domain.params import validate_params
from service.domain.queue import enqueue_job
from service.domain.record_holds import check_keys, lock_datasets
from service.domain.states import (
    JobStatus,
    Method,
    RequestStatus,
)
from service.domain.submission_batch import REQUESTS, Submission, finish_batch
from service.domain.views import accepted_view
from service.engine import canonical_json
from service.errors import Conflict, conflict, validation
from service.settings import Settings
from service.storage.group_commit import (
    batch_hints,
    batch_log,
    batch_memo,
    group_commit,
)
from service.storage.tables import Dataset, DeletionRequest, Job, Model, new_id

log = logging.getLogger("lethe.requests")

MAX_KEYS = 100_000


class DeletionRequestIn(BaseModel):
    """Body of POST /v1/deletion-requests."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="Model name.")
    dataset: str = Field(min_length=1, max_length=200, description="Dataset id (or unique name).")
    record_keys: list[str] = Field(min_length=1, max_length=MAX_KEYS)
    method: Method = Field(
        default="imu",
        description="imu (default; escalates to retrain when the model has a recipe and "
        "forgetting cannot be shown), ga, or retrain (exact: the model's recipe without the "
        "records).",
    )
    # Checked per method in service.domain.params (its models are the documented schema).
    params: Annotated[
        dict[str, Any],
        WithJsonSchema(
            {
                "anyOf": [
                    {"$ref": "#/components/schemas/IMUParams"},
                    {"$ref": "#/components/schemas/GAParams"},
                    {"$ref": "#/components/schemas/RetrainParams"},
                ],
                "description": "Method settings: IMUParams for `imu`, GAParams for `ga`, "
                "RetrainParams for `retrain`; "
                "`policy` overrides the release policy. Omitted keys keep their defaults.",
            }
        ),
    ] = Field(default_factory=dict)
    subject_ref: str | None = Field(default=None, max_length=500)
    reason: str | None = Field(default=None, max_length=10_000)


class _Replayed(Exception):
    def __init__(self, submission: Submission) -> None:
        super().__init__("idempotent replay")
        self.submission = submission


def body_fingerprint(body: DeletionRequestIn) -> str:
    return hashlib.sha256(canonical_json(body.model_dump()).encode()).hexdigest()


def _key_reused() -> Conflict:
    return conflict(
        "idempotency-key-reused",
        "this Idempotency-Key was already used with a different request body",
        title="Idempotency key reused",
    )


def _earlier_answer(session: Session, key: str, fingerprint: str) -> Submission | None:
    """The answer this Idempotency-Key already has: in this batch, or committed."""
    # The batch's log, not its memo: a twin's replay rolls its savepoint back, which empties
    # the memo, and the first answer's job row is only written in the final step.
    twin = batch_log(session).get(("idempotency", key))
    if twin is None:
        return _replay(session, key, fingerprint)
    if twin[0] != fingerprint:
        raise _key_reused()
    return twin[1]


def _replay(session: Session, key: str, fingerprint: str) -> Submission | None:
    """The first answer for this key. Keys are kept with their request for good (the unique
    column), which satisfies "at least LETHE_IDEMPOTENCY_TTL_HOURS" without a sweeper."""
    req = session.execute(
        select(DeletionRequest).where(DeletionRequest.idempotency_key == key)
    ).scalar_one_or_none()
    if req is None:
        return None
    if req.body_sha256 != fingerprint:
        raise _key_reused()
    job = session.execute(select(Job).where(Job.request_id == req.id)).scalar_one()
    return Submission(accepted_view(req.id, req.status, job.id, job.status), job.id, req.id, True)


def _model_and_dataset(session: Session, body: DeletionRequestIn) -> tuple[Model, Dataset]:
    """The model (with an active version) and the train dataset a submission names; read once
    per batch (``batch_memo``)."""
    memo = batch_memo(session)
    model = memo.get(("model", body.model))
    if model is None:
        model, active_id = model_and_active_id(session, body.model)
        if active_id is None:
            raise conflict(
                "no-active-version",
                f"model {model.name!r} has no active version",
                title="Model has no active version",
            )
        memo[("model", body.model)] = model
    dataset = memo.get(("dataset", body.dataset))
    if dataset is None:
        dataset = resolve_dataset(session, body.dataset)
        if dataset.role != "train":
            raise validation(
                f"dataset {dataset.id!r} has role {dataset.role!r}; only records of a "
                "train dataset can be forgotten",
                [{"field": "dataset", "message": "role must be train"}],
            )
        memo[("dataset", body.dataset)] = dataset
    return model, dataset


def _record_submission(
    session: Session,
    body: DeletionRequestIn,
    params: dict[str, Any],
    *,
    actor: str,
    idempotency_key: str | None,
    fingerprint: str,
    http_request_id: str | None = None,
) -> Submission:
    """Validate one submission in the batch's transaction and build its rows: they ride along
    for the batch's final step (`submission_batch.finish_batch`), which holds the records,
    gives the jobs their line positions and appends the events in bulk. A unit with an
    Idempotency-Key inserts its request row here, in its savepoint."""
    model, dataset = _model_and_dataset(session, body)
    if idempotency_key:  # a twin may have committed while we waited, or be in this batch
        # Under the dataset's lock, which a twin's batch holds from its insert to its commit:
        # a twin read as absent here cannot commit (and hold these records) before our insert
        # meets its key. Read before the lock, a twin committing in between made our own
        # records look held by another request (a 422 instead of the replay).
        lock_datasets(session, [dataset.id])
        replay = _earlier_answer(session, idempotency_key, fingerprint)
        if replay:
            raise _Replayed(replay)
    # Keys held by this batch's earlier submissions, whose holds the final step writes.
    batch_held: dict[str, str] = batch_log(session).setdefault(("held", dataset.id), {})
    also = (k for name, keys in batch_hints(session) if name == body.dataset for k in keys)
    seen = check_keys(session, dataset.id, body.record_keys, batch_held, also)
    request_id, job_id, keys = new_id(), new_id(), list(body.record_keys)
    request = {
        "id": request_id,
        "model_id": model.id,
        "dataset_id": dataset.id,
        "record_keys": keys,
        "method": body.method,
        "params": params,
        "subject_ref": body.subject_ref,
        "reason": body.reason,
        "status": RequestStatus.QUEUED,
        "idempotency_key": idempotency_key,
        "body_sha256": fingerprint,
        "actor": actor,
    }
    if idempotency_key:
        # Its own savepoint: a twin committed by another process meanwhile fails the unique
        # key here, for this submission alone (it then answers with the twin's result). Under
        # the dataset's lock (taken above), as every batch's final step takes it first: waiting
        # for a twin's key while holding nothing, not while holding what the twin's batch waits
        # for.
        session.execute(insert(REQUESTS), request)
    job = {
        "id": job_id,
        "request_id": request_id,
        "model_id": model.id,
        "method": body.method,
        "params": params,
        "http_request_id": http_request_id,
        "status": JobStatus.QUEUED,
        "progress": 0.0,
        "attempts": 0,
        "cancel_requested": False,
        "metrics": {},
        "timings": {},
    }
    event = dict(
        actor=actor,
        action="request.accepted",
        subject_type="deletion_request",
        subject_id=request_id,
        payload={
            "job_id": job_id,
            "model": model.name,
            "dataset_id": dataset.id,
            "record_count": len(body.record_keys),
            "record_keys_sha256": hashlib.sha256(
                canonical_json(sorted(body.record_keys)).encode()
            ).hexdigest(),
            "method": body.method,
            "params": params,
            "subject_ref": body.subject_ref,
        },
    )
    view = accepted_view(request_id, RequestStatus.QUEUED, job_id, JobStatus.QUEUED)
    if idempotency_key:
        twin = Submission(view, job_id, request_id, True)
        batch_log(session)[("idempotency", idempotency_key)] = (fingerprint, twin)
    batch_held.update(dict.fromkeys(body.record_keys, request_id))  # nothing below can fail
    return Submission(
        view,
        job_id,
        request_id,
        False,
        event,
        job,
        None if idempotency_key else request,
        (dataset.id, keys, request_id, seen),
    )


# Per engine: model name -> (architecture, has a recipe). Both are fixed at registration and
# models are never deleted, so a name once found needs no second read (a round trip saved
# per submission); a name not found is asked again each time.
_TRAITS: weakref.WeakKeyDictionary[Engine, dict[str, tuple[str, bool]]] = (
    weakref.WeakKeyDictionary()
)


def _model_traits(factory: sessionmaker[Session], name: str) -> tuple[str, bool] | None:
    known = _TRAITS.setdefault(factory.kw["bind"], {})
    if name not in known:
        with factory() as session:
            row = session.execute(
                select(Model.architecture, Model.recipe).where(Model.name == name)
            ).first()
        if row is None:
            return None
        known[name] = (row[0], bool(row[1]))
    return known[name]


def _checked(
    body: DeletionRequestIn, idempotency_key: str | None, traits: tuple[str, bool] | None
) -> tuple[str, dict[str, Any]]:
    """(body fingerprint, validated params); ``traits`` as `_model_traits` gives them."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise validation(
            "Idempotency-Key must be 1 to 255 characters",
            [{"field": "Idempotency-Key", "message": "length"}],
        )
    architecture, recipe = traits if traits else (None, None)
    if body.method == "retrain" and traits is not None and not recipe:
        raise validation(
            f"model {body.model!r} has no training recipe, so it cannot be retrained; register "
            "it with a `recipe`, or use method imu",
            [{"field": "method", "message": "the model has no recipe"}],
        )
    return body_fingerprint(body), validate_params(body.method, body.params, architecture)


def _queued(
    body: DeletionRequestIn,
    traits: tuple[str, bool] | None,
    *,
    actor: str,
    idempotency_key: str | None,
    http_request_id: str | None,
) -> tuple[str, Callable[[Session], Submission], dict[str, Any]]:
    """The body's fingerprint, the group-commit unit that records this submission, and how
    it is queued (``traits`` as `_model_traits` gives them)."""
    fingerprint, params = _checked(body, idempotency_key, traits)

    def unit(session: Session) -> Submission:
        return _record_submission(
            session,
            body,
            params,
            actor=actor,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            http_request_id=http_request_id,
        )

    # Without a key the unit only reads and raises before its writes (the final step's).
    options = {
        "final": finish_batch,
        "savepoint": idempotency_key is not None,
        "hint": (body.dataset, body.record_keys),
    }
    return fingerprint, unit, options


def _accepted(result: Submission) -> Submission:
    log.info("deletion request %s accepted: job %s queued", result.request_id, result.job_id)
    return result


def _twin_answer(
    factory: sessionmaker[Session], key: str | None, fingerprint: str, exc: IntegrityError
) -> Submission:
    """Only the idempotency key is unique here: a twin won the race; answer with its result."""
    if not key:
        raise exc
    with factory() as session:
        replay = _replay(session, key, fingerprint)
    if replay is None:
        raise exc
    return replay


def submit_deletion_request(
    factory: sessionmaker[Session],
    settings: Settings,
    body: DeletionRequestIn,
    *,
    actor: str,
    idempotency_key: str | None = None,
    http_request_id: str | None = None,
) -> Submission:
    """Validate and record a deletion request + its queued job, then enqueue the job.

    ``http_request_id`` (the API's X-Request-ID) is stored on the job so that the worker's
    log lines for it name the request that created it. Passed explicitly: group commit
    records this submission on its own thread."""
    fingerprint, unit, options = _queued(
        body,
        _model_traits(factory, body.model),
        actor=actor,
        idempotency_key=idempotency_key,
        http_request_id=http_request_id,
    )
    if idempotency_key:
        with factory() as session:
            replay = _replay(session, idempotency_key, fingerprint)
        if replay:
            return replay
    try:
        result = group_commit(factory).run(unit, **options)
    except _Replayed as replayed:
        return replayed.submission
    except IntegrityError as exc:
        return _twin_answer(factory, idempotency_key, fingerprint, exc)
    if result.wake:
        enqueue_job(settings, result.job_id)
    return _accepted(result)


async def submit_deletion_request_async(
    factory: sessionmaker[Session],
    settings: Settings,
    body: DeletionRequestIn,
    *,
    actor: str,
    idempotency_key: str | None = None,
    http_request_id: str | None = None,
) -> Submission:
    """`submit_deletion_request` for the event loop, which nothing blocks on the common path:
    the unit itself answers an Idempotency-Key that was already used (there is no read
    first), and only a model not looked up before, a twin's answer after a lost race and the
    run message of a job that heads its line go to a worker thread."""
    traits = _TRAITS.get(factory.kw["bind"], {}).get(body.model)
    if traits is None:
        traits = await asyncio.to_thread(_model_traits, factory, body.model)
    fingerprint, unit, options = _queued(
        body, traits, actor=actor, idempotency_key=idempotency_key, http_request_id=http_request_id
    )
    try:
        result = await group_commit(factory).run_async(unit, **options)
    except _Replayed as replayed:
        return replayed.submission
    except IntegrityError as exc:
        return await asyncio.to_thread(_twin_answer, factory, idempotency_key, fingerprint, exc)
    if result.wake:
        await asyncio.to_thread(enqueue_job, settings, result.job_id)
    return _accepted(result)
