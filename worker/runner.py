"""The job runner: claim → loading → influence → unlearning → evaluating → saving.

Plain functions over a session factory and a storage, with no Celery in sight: the Celery task
(`worker.tasks`) and the embedded executor (`worker.embedded`) call the same `run_job`.

Per-model ordering (DESIGN §3). The database is the single source of truth; broker messages
are only wake-up calls. A job may be claimed only when no earlier-submitted job of the same
model is still queued or running. The claim runs in one transaction that first locks the
model row (SELECT … FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises every
writer), so two workers can never both pass that check for one model, whatever the number of
workers or queues. A message for a job that cannot run yet is simply acknowledged and dropped:
no busy spinning, no held messages. When a job reaches a final state the runner wakes the next
queued job of that model (`wake`), and the reaper re-sends wake-ups for any head-of-line job
whose message was lost (broker restart), so nothing waits forever. Each job starts from the
model's active version at claim time, so deletions compound.

Exactly-once result. Every write after the claim is fenced on (status=running, worker_id,
attempts): a worker that lost its lease cannot save. The checkpoint goes to a key derived from
the job id and attempt (`checkpoints/<model>/job-<job>-a<attempt>.safetensors`, written to a
temp name and renamed), then ONE transaction creates version n+1 and, by the release policy
(service.policy), either activates it (supersedes n, marks the records forgotten, request
completed) or keeps it a candidate (request needs_review), finishes the job and appends the
audit events. The unique constraint on ModelVersion.job_id backs this up. If that
transaction fails the file is deleted; files of attempts that died before committing are
deleted when the job ends. After an activating commit, the records' content is purged from
the dataset store and superseded checkpoints due for retirement are deleted
(`after_activation`; idempotent, finished by the reaper if interrupted).

Errors. `JobError` is deterministic (missing or already-forgotten records, corrupt or missing
checkpoint, unreadable dataset, invalid parameters, unknown architecture, time limit): the job
fails at once, retrying cannot help. Anything else (database or storage unreachable, CUDA out
of memory, a source version changed under us) is treated as transient: the job goes back to
`queued` with the error recorded and is retried until `max_attempts` claims have been made,
after which it fails for good with the last error. If even recording the error is impossible
(database down), the job keeps its lease until it expires and the reaper re-queues it.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.audit import append_event
from service.db import make_engine, make_session_factory, transaction
from service.domain.models import active_version
from service.models import (
    Dataset,
    DeletionRequest,
    Job,
    Model,
    ModelVersion,
    Record,
)
from service.policy import decide, effective_policy
from service.problems import problem_dict
from service.purge import key_sha256
from service.settings import Settings
from service.storage import Storage
from worker.heldout import split_eval_keys
from worker.lease import JobMonitor, as_utc, holder_is_dead, lease_until, utcnow

log = logging.getLogger("lethe.worker")

PHASES = ("loading", "influence", "unlearning", "evaluating", "saving")
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
REQUEST_STATUS = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}
_IN_CHUNK = 500  # keys per IN (...) clause


# --------------------------------------------------------------------------- errors


class JobError(Exception):
    """A deterministic failure: retrying the job cannot change the outcome."""

    def __init__(
        self,
        slug: str,
        title: str,
        detail: str,
        *,
        status: int = 422,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.slug, self.title, self.detail, self.status, self.errors = (
            slug, title, detail, status, errors,
        )  # fmt: skip

    def problem(self) -> dict[str, Any]:
        return problem_dict(self.slug, self.title, self.status, self.detail, self.errors)


class Cancelled(Exception):
    """cancel_requested was seen: stop, create nothing."""


class Interrupted(Exception):
    """The worker is shutting down: hand the job back without spending an attempt."""


class LeaseLost(Exception):
    """Another worker owns the job now (our lease expired and was taken over)."""


class SourceChanged(Exception):
    """The model's active version moved while the job ran: retry from the new one."""


def transient_problem(exc: BaseException) -> dict[str, Any]:
    return problem_dict(
        "job-attempt-failed",
        "Job attempt failed",
        503,
        f"{type(exc).__name__}: {exc}"[:2000],
    )


def worker_lost_problem(worker_id: str | None) -> dict[str, Any]:
    return problem_dict(
        "worker-lost",
        "Worker lost",
        503,
        f"the worker running this job ({worker_id or 'unknown'}) stopped renewing its lease",
    )


# --------------------------------------------------------------------------- context


@dataclass
class RunnerContext:
    """What a job needs from its process: database, storage, identity, device."""

    settings: Settings
    session_factory: sessionmaker[Session]
    storage: Storage
    worker_id: str
    wake: Callable[[str], None] | None = None  # tell an executor a job became runnable
    interrupt: threading.Event = field(default_factory=threading.Event)
    # Fault-injection seams for tests, keyed by point name ("before_save"); called with the
    # job id. Empty in production.
    hooks: dict[str, Callable[[str], None]] = field(default_factory=dict)
    _device: str | None = None

    @property
    def actor(self) -> str:
        return f"worker:{self.worker_id}"

    @property
    def device(self) -> str:
        if self._device is None:
            from worker.device import resolve_device

            self._device = resolve_device(self.settings.device)
        return self._device

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        worker_id: str | None = None,
        wake: Callable[[str], None] | None = None,
    ) -> RunnerContext:
        from worker.lease import worker_identity

        factory = make_session_factory(make_engine(settings.db_url))
        return cls(
            settings=settings,
            session_factory=factory,
            storage=Storage.from_settings(settings),
            worker_id=worker_id or worker_identity(),
            wake=wake,
        )

    def hook(self, point: str, job_id: str) -> None:
        fn = self.hooks.get(point)
        if fn is not None:
            fn(job_id)


# --------------------------------------------------------------------------- outcomes


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"  # back to queued, or (database down) left for the reaper
    INTERRUPTED = "interrupted"  # handed back on shutdown
    LOST = "lost"  # someone else owns it
    MISSING = "missing"
    FINISHED = "finished"  # already in a final state (duplicate delivery)
    BUSY = "busy"  # running elsewhere under a live lease
    BLOCKED = "blocked"  # an earlier job of the same model is not finished


@dataclass
class RunResult:
    outcome: Outcome
    job_id: str
    detail: str = ""
    retry_in: float | None = None
    version_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "job_id": self.job_id,
            "detail": self.detail,
            "retry_in": self.retry_in,
            "version_id": self.version_id,
        }


@dataclass
class Claim:
    outcome: Outcome | None  # None = claimed, proceed
    job_id: str
    model_id: str = ""
    attempt: int = 0
    detail: str = ""


# --------------------------------------------------------------------------- helpers


def checkpoint_key(model_id: str, job_id: str, attempt: int) -> str:
    return f"checkpoints/{model_id}/job-{job_id}-a{attempt}.safetensors"


def cleanup_job_checkpoints(
    storage: Storage, model_id: str, job_id: str, keep: str | None = None
) -> list[str]:
    """Delete files that attempts of this job wrote but never committed (best effort)."""
    removed = []
    try:
        for key in list(storage.iter_keys(f"checkpoints/{model_id}/job-{job_id}-")):
            if key != keep:
                storage.delete(key)
                removed.append(key)
    except Exception as exc:
        log.warning("job %s: could not clean up checkpoints: %s", job_id, exc)
    return removed


def lock_model(session: Session, model_id: str) -> Model | None:
    """Serialise everything that changes one model's job line (no-op lock on SQLite)."""
    return session.execute(
        select(Model).where(Model.id == model_id).with_for_update()
    ).scalar_one_or_none()


def lock_job(session: Session, job_id: str) -> Job | None:
    return session.execute(
        select(Job).where(Job.id == job_id).with_for_update().execution_options(
            populate_existing=True
        )
    ).scalar_one_or_none()


def blocking_job(session: Session, job: Job) -> str | None:
    """Id of a job of the same model that must finish before `job` may start."""
    return session.execute(
        select(Job.id)
        .where(
            Job.model_id == job.model_id,
            Job.id != job.id,
            (Job.status == "running")
            | ((Job.status == "queued") & (Job.submitted_seq < job.submitted_seq)),
        )
        .order_by(Job.submitted_seq)
        .limit(1)
    ).scalar_one_or_none()


def next_runnable_of_model(session: Session, model_id: str) -> str | None:
    """The head of the model's line if it is queued (nothing running before it)."""
    row = session.execute(
        select(Job.id, Job.status)
        .where(Job.model_id == model_id, Job.status.in_(ACTIVE))
        .order_by(Job.submitted_seq)
        .limit(1)
    ).first()
    return row.id if row is not None and row.status == "queued" else None


def runnable_jobs(session: Session) -> list[str]:
    """Heads of every model's line that are queued, oldest submission first."""
    rows = session.execute(
        select(Job.id, Job.model_id, Job.status, Job.submitted_seq)
        .where(Job.status.in_(ACTIVE))
        .order_by(Job.submitted_seq)
    ).all()
    seen: set[str] = set()
    heads = []
    for row in rows:
        if row.model_id in seen:
            continue
        seen.add(row.model_id)
        if row.status == "queued":
            heads.append(row.id)
    return heads


def finish_job(
    session: Session,
    job: Job,
    status: str,
    *,
    actor: str,
    error: dict[str, Any] | None = None,
    payload: dict[str, Any] | None = None,
    request_status: str | None = None,
) -> None:
    """Move a job (and its request) to a final state with its audit event.

    `request_status` overrides the request's usual status (a succeeded job whose version
    waits for review leaves its request `needs_review`, not `completed`)."""
    now = utcnow()
    job.status = status
    job.finished_at = now
    job.lease_expires_at = None
    if error is not None:
        job.error = error
    request = session.get(DeletionRequest, job.request_id)
    if request is not None:
        request.status = request_status or REQUEST_STATUS[status]
    body = {"attempts": job.attempts, **(payload or {})}
    if error is not None:
        body["error"] = {"type": error.get("type"), "detail": error.get("detail")}
    append_event(
        session, actor=actor, action=f"job.{status}", subject_type="job", subject_id=job.id,
        payload=body,
    )  # fmt: skip


def _mark_forgotten(
    session: Session, dataset_id: str, keys: Sequence[str], job_id: str, now: Any
) -> int:
    from service.forgetting import mark_forgotten

    forgotten = mark_forgotten(session, dataset_id, keys, job_id, now)
    if forgotten != len(set(keys)):
        raise JobError(
            "records-unavailable", "Records unavailable",
            f"only {forgotten} of {len(keys)} records were still present at save",
        )  # fmt: skip
    return forgotten


def after_activation(ctx: RunnerContext, model_id: str, dataset_id: str) -> None:
    """Post-commit steps once a version without some records is active: purge their content
    and retire superseded checkpoints that are due. Idempotent; the reaper finishes either if
    it fails here."""
    from service.purge import purge_dataset
    from service.retention import retire_due

    try:
        result = purge_dataset(ctx.session_factory, ctx.storage, dataset_id, actor=ctx.actor)
        if result.new_key:
            _DATASETS.evict_other_files(result.new_key)
    except Exception as exc:
        log.warning("dataset %s: purge failed (%s); the reaper will retry", dataset_id, exc)
    try:
        retire_due(
            ctx.session_factory, ctx.storage, ctx.settings, actor=ctx.actor, model_id=model_id
        )
    except Exception as exc:
        log.warning("model %s: retiring superseded checkpoints failed: %s", model_id, exc)


def _chunks(values: Sequence[str], size: int = _IN_CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _source(dataset: Dataset) -> tuple[str, str, str, str, str]:
    return (dataset.kind, dataset.storage_key, dataset.name, dataset.content_sha256, dataset.id)


class _DatasetCache:
    """Parsed dataset files kept between jobs of one process (the eval and member-probe sets
    are read by every job of a model). Keyed by storage key and content sha256, so a file
    rewritten by a purge is never served stale; bounded in entries and bytes."""

    def __init__(self, max_entries: int = 4, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], data: Any) -> None:
        size = int(getattr(data.inputs, "nbytes", 0))
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.max_entries or self._total() > self.max_bytes:
                self._items.popitem(last=False)

    def evict_other_files(self, storage_key: str) -> None:
        """Drop cached copies of earlier files of the same dataset (a purge rewrote it): the
        forgotten rows must not outlive their file in memory either."""
        prefix = _dataset_prefix(storage_key)
        with self._lock:
            for key in [k for k in self._items if k[0] != storage_key
                        and _dataset_prefix(k[0]) == prefix]:
                del self._items[key]

    def _total(self) -> int:
        return sum(int(getattr(d.inputs, "nbytes", 0)) for d in self._items.values())


def _dataset_prefix(storage_key: str) -> str:
    # datasets/<36-char dataset id>[-<rewrite>].<ext>
    name = storage_key.rsplit("/", 1)[-1]
    return name[:36]


_DATASETS = _DatasetCache()


# --------------------------------------------------------------------------- claim


def claim_job(ctx: RunnerContext, job_id: str) -> Claim:
    """Atomically take a queued job (or one whose holder's lease expired or who died).

    One transaction: lock the model row, then the job row, re-check every condition on the
    locked rows (final? live lease elsewhere? cancel requested? attempts left? an earlier job
    of the model unfinished?) and move queued/expired-running → running with attempt + 1,
    worker id, lease and source version. Equivalent to a conditional UPDATE, but the model
    lock also makes the ordering check race-free across workers.
    """
    settings = ctx.settings
    device = ctx.device  # resolved before the transaction; may raise DeviceUnavailable
    with transaction(ctx.session_factory) as session:
        model_id = session.execute(
            select(Job.model_id).where(Job.id == job_id)
        ).scalar_one_or_none()
        if model_id is None:
            return Claim(Outcome.MISSING, job_id, detail="no such job")
        lock_model(session, model_id)
        job = lock_job(session, job_id)
        assert job is not None
        if job.status in TERMINAL:
            return Claim(Outcome.FINISHED, job_id, model_id, detail=f"already {job.status}")
        existing = session.execute(
            select(ModelVersion.id, ModelVersion.status).where(ModelVersion.job_id == job_id)
        ).first()
        if existing is not None:  # defensive: a version exists, so the job is done
            job.result_version_id = existing.id
            job.progress = 1.0
            finish_job(
                session, job, "succeeded", actor=ctx.actor, payload={"recovered": True},
                request_status="needs_review" if existing.status == "candidate" else None,
            )  # fmt: skip
            return Claim(Outcome.FINISHED, job_id, model_id, detail="version already exists")
        if job.status == "running":
            lease = as_utc(job.lease_expires_at)
            alive = lease is not None and lease > utcnow() and not holder_is_dead(job.worker_id)
            if alive:
                return Claim(Outcome.BUSY, job_id, model_id, detail=f"held by {job.worker_id}")
        if job.cancel_requested:
            finish_job(session, job, "cancelled", actor=ctx.actor)
            return Claim(Outcome.CANCELLED, job_id, model_id, detail="cancelled before start")
        if job.attempts >= settings.max_attempts:
            finish_job(
                session, job, "failed", actor=ctx.actor,
                # A running job's holder is the last attempt's worker; job.error may still
                # name the worker of an earlier attempt.
                error=worker_lost_problem(job.worker_id) if job.status == "running"
                else job.error or worker_lost_problem(None),
            )  # fmt: skip
            return Claim(Outcome.FAILED, job_id, model_id, detail="attempts exhausted")
        blocker = blocking_job(session, job)
        if blocker is not None:
            return Claim(Outcome.BLOCKED, job_id, model_id, detail=f"waits for job {blocker}")
        source = active_version(session, model_id)
        if source is None:
            finish_job(
                session, job, "failed", actor=ctx.actor,
                error=problem_dict(
                    "no-active-version", "Model has no active version", 409,
                    "the model has no active version to unlearn from",
                ),
            )  # fmt: skip
            return Claim(Outcome.FAILED, job_id, model_id, detail="no active version")
        takeover = job.status == "running"
        # Compare-and-swap on (status, attempts): every claim bumps attempts, so the UPDATE
        # matches only if nobody claimed the job since we read it, even without row locks.
        swapped = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == job.status, Job.attempts == job.attempts)
            .values(
                status="running",
                attempts=Job.attempts + 1,
                worker_id=ctx.worker_id,
                device=device,
                lease_expires_at=lease_until(settings.lease_seconds),
                phase="loading",
                progress=0.0,
                source_version_id=source.id,
                started_at=func.coalesce(Job.started_at, utcnow()),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if swapped != 1:
            return Claim(Outcome.BUSY, job_id, model_id, detail="claimed by another worker")
        session.refresh(job)
        request = session.get(DeletionRequest, job.request_id)
        if request is not None:
            request.status = "running"
        append_event(
            session, actor=ctx.actor, action="job.claimed", subject_type="job", subject_id=job.id,
            payload={"attempt": job.attempts, "device": device, "source_version_id": source.id,
                     "takeover": takeover},
        )  # fmt: skip
        return Claim(None, job_id, model_id, job.attempts)


# --------------------------------------------------------------------------- execution


@dataclass
class Loaded:
    model: Any  # torch.nn.Module
    forget: tuple[Any, Any]
    eval: tuple[Any, Any] | None
    member_probe: tuple[Any, Any] | None
    kind: str
    params: dict[str, Any]
    keys: list[str]
    dataset_id: str
    source_version_id: str
    source_number: int
    class_wise: bool = False
    guard: tuple[Any, Any] | None = None  # eval records the calibration may look at
    eval_split: dict[str, Any] | None = None


class _Execution:
    def __init__(self, ctx: RunnerContext, claim: Claim) -> None:
        self.ctx = ctx
        self.job_id = claim.job_id
        self.model_id = claim.model_id
        self.attempt = claim.attempt
        self.monitor = JobMonitor(
            ctx.session_factory,
            job_id=self.job_id,
            worker_id=ctx.worker_id,
            attempt=claim.attempt,
            lease_seconds=ctx.settings.lease_seconds,
            heartbeat_seconds=ctx.settings.heartbeat_seconds,
        )
        self.timings: dict[str, float] = {}
        self._phase: str | None = None
        self._phase_started = 0.0
        self.written_key: str | None = None

    # Phases and progress ------------------------------------------------------------
    def _enter(self, phase: str) -> None:
        if phase == self._phase:
            return
        self._close_phase()
        self._phase, self._phase_started = phase, time.perf_counter()
        self.monitor.report(phase, 0.0)

    def _close_phase(self) -> None:
        if self._phase is not None:
            now = time.perf_counter()
            spent = now - self._phase_started
            self.timings[self._phase] = self.timings.get(self._phase, 0.0) + spent
            self._phase_started = now

    def check(self) -> None:
        if self.monitor.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease taken over")
        if self.monitor.cancel_requested.is_set():
            raise Cancelled(f"job {self.job_id}: cancel requested")
        if self.ctx.interrupt.is_set():
            raise Interrupted(f"job {self.job_id}: worker shutting down")

    def progress(self, phase: str, fraction: float) -> None:
        phase = phase if phase in PHASES else (self._phase or "unlearning")
        self._enter(phase)
        fraction = min(1.0, max(0.0, float(fraction))) if math.isfinite(fraction) else 0.0
        self.monitor.report(phase, fraction)
        self.check()

    # Main ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.perf_counter()
        self.monitor.start()
        try:
            self._enter("loading")
            loaded = self._load()
            self.check()
            before = self._evaluate(loaded)
            self.check()
            stats = self._unlearn(loaded)
            self._enter("evaluating")
            self.check()
            after = self._evaluate(loaded)
            self.progress("evaluating", 1.0)
            self._enter("saving")
            self.check()
            self.timings["total"] = time.perf_counter() - started
            version_id = self._save(loaded, before, after, stats, started)
            return RunResult(Outcome.SUCCEEDED, self.job_id, version_id=version_id)
        except Cancelled:
            return self._finish_cancelled()
        except Interrupted:
            return self._hand_back()
        except LeaseLost as exc:
            log.warning("%s", exc)
            self._delete_written()
            return RunResult(Outcome.LOST, self.job_id, detail=str(exc))
        except JobError as exc:
            return self._fail(exc.problem())
        except Exception as exc:
            if _is_time_limit(exc):
                return self._fail(
                    problem_dict(
                        "time-limit", "Job exceeded its time limit", 504,
                        f"the job ran longer than {self.ctx.settings.job_soft_time_limit_s} s",
                    )  # fmt: skip
                )
            log.exception("job %s attempt %s failed", self.job_id, self.attempt)
            return self._retry_or_fail(exc)
        finally:
            self.monitor.stop()

    # Loading ---------------------------------------------------------------------------
    def _load(self) -> Loaded:
        with transaction(self.ctx.session_factory) as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            request = session.get(DeletionRequest, job.request_id)
            model_row = session.get(Model, job.model_id)
            version = session.get(ModelVersion, job.source_version_id)
            assert request is not None and model_row is not None and version is not None
            dataset = session.get(Dataset, request.dataset_id)
            if dataset is None:
                raise JobError(
                    "dataset-missing", "Dataset missing", "the dataset is gone", status=404
                )
            keys = [str(k) for k in request.record_keys]
            self._check_records(session, dataset.id, keys)
            eval_ds = (
                session.get(Dataset, model_row.eval_dataset_id)
                if model_row.eval_dataset_id
                else None
            )
            probe_ds = (
                session.get(Dataset, model_row.member_probe_dataset_id)
                if model_row.member_probe_dataset_id
                else None
            )
            eval_keys = self._present_keys(session, eval_ds)
            probe_keys = self._present_keys(session, probe_ds)
            info = {
                "arch": model_row.architecture,
                "arch_kwargs": dict(model_row.arch_kwargs or {}),
                "version_key": version.storage_key,
                "version_sha": version.sha256,
                "version_number": version.number,
                "version_id": version.id,
                "dataset": _source(dataset),
                "eval": _source(eval_ds) if eval_ds else None,
                "probe": _source(probe_ds) if probe_ds else None,
                "kind": job.kind,
                "params": dict(job.params or {}),
            }
        self.progress("loading", 0.1)
        model = self._load_model(info)
        self.progress("loading", 0.4)
        forget = self._load_rows(info["dataset"], keys)
        class_wise = self._class_wise(info["dataset"], keys)
        self.progress("loading", 0.6)
        eval_pair = guard_pair = split = None
        if info["eval"]:
            if eval_keys is None:
                eval_keys = [str(k) for k in self._dataset(info["eval"]).ids]
            split = split_eval_keys(eval_keys)
            eval_pair = self._load_rows(info["eval"], split.policy)
            guard_pair = self._load_rows(info["eval"], split.guard)
        probe_pair = self._load_rows(info["probe"], probe_keys) if info["probe"] else None
        self.progress("loading", 0.8)
        return Loaded(
            model=model, forget=forget, eval=eval_pair, member_probe=probe_pair,
            guard=guard_pair, eval_split=split.describe() if split else None,
            kind=info["kind"], params=info["params"], keys=keys, dataset_id=dataset.id,
            source_version_id=info["version_id"], source_number=info["version_number"],
            class_wise=class_wise,
        )  # fmt: skip

    def _check_records(self, session: Session, dataset_id: str, keys: list[str]) -> None:
        if not keys:
            raise JobError(
                "records-unavailable", "No records to forget", "the request names no records"
            )
        states: dict[str, str] = {}
        for chunk in _chunks(keys):
            for key, state in session.execute(
                select(Record.key, Record.state).where(
                    Record.dataset_id == dataset_id, Record.key.in_(chunk)
                )
            ):
                states[key] = state
        problems = [
            {"key": k, "reason": "not in the dataset" if k not in states else "already forgotten"}
            for k in keys
            if states.get(k) != "present"
        ]
        if problems:
            raise JobError(
                "records-unavailable",
                "Records unavailable",
                f"{len(problems)} of the requested records are missing or already forgotten",
                errors=problems[:100],
            )

    @staticmethod
    def _present_keys(session: Session, dataset: Dataset | None) -> list[str] | None:
        if dataset is None:
            return None
        return list(
            session.execute(
                select(Record.key)
                .where(Record.dataset_id == dataset.id, Record.state == "present")
                .order_by(Record.row)
            ).scalars()
        )

    def _read_object(self, key: str | None, what: str) -> bytes:
        if not key:
            raise JobError("checkpoint-missing", f"{what} missing", f"{what} has no stored file")
        try:
            with self.ctx.storage.open_read(key) as fh:
                return fh.read()
        except FileNotFoundError:
            raise JobError(
                f"{'checkpoint' if 'checkpoint' in what else 'dataset'}-missing",
                f"{what} missing",
                f"{what} ({key}) is not in storage",
                status=500,
            ) from None

    def _load_model(self, info: dict[str, Any]) -> Any:
        from worker.imu.architectures import build
        from worker.imu.checkpoints import load_safetensors_into

        what = f"checkpoint of version {info['version_number']}"
        try:
            data = self._read_object(info["version_key"], what)
        except JobError:
            # A promotion may have superseded (and retired) our source since the claim:
            # then retry from the new active version instead of failing the job.
            with transaction(self.ctx.session_factory) as session:
                status = session.execute(
                    select(ModelVersion.status).where(ModelVersion.id == info["version_id"])
                ).scalar_one_or_none()
            if status != "active":
                raise SourceChanged(
                    f"version {info['version_number']} is {status} and its checkpoint retired; "
                    "the job restarts from the active version"
                ) from None
            raise
        digest = hashlib.sha256(data).hexdigest()
        if digest != info["version_sha"]:
            raise JobError(
                "checkpoint-corrupt",
                "Checkpoint corrupt",
                f"the {what} ({info['version_key']}) has sha256 {digest[:16]}…, but "
                f"{info['version_sha'][:16]}… was registered: the stored file was altered or "
                "damaged",
                status=500,
            )
        try:
            model = build(info["arch"], **info["arch_kwargs"])
        except (ValueError, TypeError, KeyError) as exc:
            raise JobError("architecture-invalid", "Architecture invalid", str(exc)) from None
        try:
            load_safetensors_into(model, data)
        except (ValueError, RuntimeError) as exc:
            raise JobError(
                "checkpoint-corrupt",
                "Checkpoint corrupt",
                f"the {what} cannot be loaded into {info['arch']}: {exc}"[:2000],
                status=500,
            ) from None
        return model

    def _current_source(self, dataset_id: str) -> tuple[str, str, str, str, str] | None:
        with transaction(self.ctx.session_factory) as session:
            dataset = session.get(Dataset, dataset_id)
            return _source(dataset) if dataset is not None else None

    def _dataset(self, source: tuple[str, str, str, str, str]) -> Any:
        """The parsed current file of a dataset (cached). A purge may have replaced the file
        since its key was read: follow the dataset to its new file."""
        from service.datasets_io import load_tensor_npz

        for _ in range(5):
            kind, key, name, content_sha, dataset_id = source
            data = _DATASETS.get((key, content_sha))
            if data is not None:
                return data
            try:
                raw = self._read_object(key, f"dataset {name!r}")
            except JobError:
                current = self._current_source(dataset_id)
                if current is None or current[1] == key:
                    raise
                source = current
                continue
            data = load_tensor_npz(raw)
            _DATASETS.evict_other_files(key)
            _DATASETS.put((key, content_sha), data)
            return data
        raise SourceChanged(f"dataset {source[2]!r} kept changing while it was read")

    def _class_wise(self, source: tuple[str, str, str, str, str], keys: list[str]) -> bool:
        """Whether the forget set holds every record of its classes left in the dataset."""
        try:
            data = self._dataset(source)
        except Exception:
            return False
        forget = set(keys)
        labels = {int(label) for key, label in zip(data.ids, data.labels, strict=True)
                  if key in forget}
        return not any(int(label) in labels and key not in forget
                       for key, label in zip(data.ids, data.labels, strict=True))

    def _load_rows(
        self, source: tuple[str, str, str, str, str], keys: list[str] | None
    ) -> tuple[Any, Any]:
        import torch

        from service.datasets_io import DatasetError, select_rows

        kind, key, name, content_sha, _dataset_id = source
        if kind != "tensor":
            raise JobError(
                "unsupported-dataset", "Unsupported dataset",
                f"dataset {name!r} is of kind {kind!r}; this worker unlearns tensor datasets",
            )  # fmt: skip
        try:
            data = self._dataset(source)
            inputs, labels = select_rows(data, keys if keys is not None else data.ids)
        except DatasetError as exc:
            raise JobError("dataset-invalid", "Dataset unreadable", f"{name}: {exc}") from None
        except KeyError as exc:
            raise JobError(
                "records-unavailable", "Records unavailable", f"{name}: {exc.args[0]}"
            ) from None
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        return x, y

    # Engine ----------------------------------------------------------------------------
    def _evaluate(self, loaded: Loaded) -> dict[str, Any]:
        from worker.job_metrics import job_metrics

        return job_metrics(
            loaded.model, forget=loaded.forget, eval_pair=loaded.eval,
            member_probe=loaded.member_probe, class_wise=loaded.class_wise,
        )  # fmt: skip

    def _unlearn(self, loaded: Loaded) -> dict[str, Any]:
        from worker.unlearning import InvalidParams, run_engine

        try:
            return run_engine(
                loaded.kind, loaded.params, loaded.model, loaded.forget, guard=loaded.guard,
                class_wise=loaded.class_wise, device=self.ctx.device, progress=self.progress,
                key_hash=lambda i: key_sha256(loaded.keys[i]),
            )  # fmt: skip
        except InvalidParams as exc:
            if self.monitor.cancel_requested.is_set():
                raise Cancelled() from None
            raise JobError("invalid-params", "Invalid parameters", str(exc)) from None

    # Saving ----------------------------------------------------------------------------
    def _save(
        self,
        loaded: Loaded,
        before: dict[str, Any],
        after: dict[str, Any],
        stats: dict[str, Any],
        started: float,
    ) -> str:
        from worker.imu.checkpoints import to_bytes

        key = checkpoint_key(self.model_id, self.job_id, self.attempt)
        data = to_bytes(loaded.model, metadata={"lethe_job_id": self.job_id})
        self.written_key = key
        sha, size = self.ctx.storage.write_bytes(key, data)
        del data
        self.progress("saving", 0.5)
        self.ctx.hook("before_save", self.job_id)
        self._close_phase()
        self.timings["total"] = time.perf_counter() - started
        policy = decide(
            effective_policy(self.ctx.settings, loaded.params.get("policy")),
            before, after, class_wise=loaded.class_wise,
        )  # fmt: skip
        metrics = {
            "before": before,
            "after": after,
            "influence": stats,
            "device": self.ctx.device,
            "method": loaded.kind,
            "n_forget": len(loaded.keys),
            "eval_split": loaded.eval_split,
            "policy": policy,
        }
        try:
            version_id = self._commit(loaded, key, sha, size, metrics)
        except BaseException:
            self._delete_written()
            raise
        cleanup_job_checkpoints(self.ctx.storage, self.model_id, self.job_id, keep=key)
        if policy["decision"] == "active":
            after_activation(self.ctx, self.model_id, loaded.dataset_id)
        return version_id

    def _commit(
        self, loaded: Loaded, key: str, sha: str, size: int, metrics: dict[str, Any]
    ) -> str:
        actor = self.ctx.actor
        with transaction(self.ctx.session_factory) as session:
            lock_model(session, self.model_id)
            job = lock_job(session, self.job_id)
            if not self._still_ours(job):
                raise LeaseLost(f"job {self.job_id}: claim lost before saving")
            if job.cancel_requested:
                raise Cancelled()
            source = active_version(session, self.model_id)
            if source is None or source.id != loaded.source_version_id:
                raise SourceChanged(
                    f"the model's active version changed from {loaded.source_version_id} "
                    f"to {source.id if source else None} while the job ran"
                )
            number = (
                session.execute(
                    select(func.max(ModelVersion.number)).where(
                        ModelVersion.model_id == self.model_id
                    )
                ).scalar_one()
                or 0
            ) + 1
            now = utcnow()
            status = metrics["policy"]["decision"]  # active | candidate
            version = ModelVersion(
                model_id=self.model_id, number=number, parent_id=source.id, job_id=job.id,
                storage_key=key, sha256=sha, size_bytes=size, status=status,
                metrics=metrics, created_at=now,
            )  # fmt: skip
            session.add(version)
            session.flush()  # the unique job_id constraint fires here, inside the transaction
            forgotten = 0
            if status == "active":
                source.status = "superseded"
                source.superseded_at = now
                forgotten = _mark_forgotten(session, loaded.dataset_id, loaded.keys, job.id, now)
            job.result_version_id = version.id
            job.metrics = metrics
            job.timings = {k: round(v, 6) for k, v in self.timings.items()}
            job.phase = "saving"
            job.progress = 1.0
            job.error = None
            finish_job(
                session, job, "succeeded", actor=actor,
                payload={"result_version_id": version.id, "worker_id": self.ctx.worker_id,
                         "decision": status},
                request_status="completed" if status == "active" else "needs_review",
            )  # fmt: skip
            append_event(
                session, actor=actor, action="version.created", subject_type="model_version",
                subject_id=version.id,
                payload={"model_id": self.model_id, "number": number, "parent_id": source.id,
                         "job_id": job.id, "request_id": job.request_id, "sha256": sha,
                         "size_bytes": size, "status": status,
                         "superseded_id": source.id if status == "active" else None,
                         "policy": {"failed": metrics["policy"]["failed"],
                                    "mode": metrics["policy"]["mode"]}},
            )  # fmt: skip
            if status == "active":
                from service.forgetting import append_forgotten_event

                append_forgotten_event(
                    session, actor=actor, dataset_id=loaded.dataset_id, job_id=job.id,
                    request_id=job.request_id, keys=loaded.keys, count=forgotten,
                )
            return version.id

    # Endings ---------------------------------------------------------------------------
    def _delete_written(self) -> None:
        if self.written_key is not None:
            try:
                self.ctx.storage.delete(self.written_key)
            except Exception as exc:
                log.warning("job %s: could not delete %s: %s", self.job_id, self.written_key, exc)
            self.written_key = None

    def _still_ours(self, job: Job | None) -> bool:
        """The fence: the job is still running under this worker and this attempt."""
        return (
            job is not None
            and job.status == "running"
            and job.worker_id == self.ctx.worker_id
            and job.attempts == self.attempt
        )

    def _fenced_update(self, apply: Callable[[Session, Job], None]) -> bool:
        """Run `apply` on our still-claimed job in one transaction; False if we lost it."""
        with transaction(self.ctx.session_factory) as session:
            lock_model(session, self.model_id)
            job = lock_job(session, self.job_id)
            if not self._still_ours(job):
                return False
            apply(session, job)
            return True

    def _finish_cancelled(self) -> RunResult:
        return self._record_end(
            "cancelled", Outcome.CANCELLED, payload={"phase": self._phase}, detail=""
        )

    def _fail(self, problem: dict[str, Any]) -> RunResult:
        return self._record_end(
            "failed", Outcome.FAILED, error=problem, detail=problem.get("detail", "")
        )

    def _record_end(
        self, status: str, outcome: Outcome, *, detail: str, **finish: Any
    ) -> RunResult:
        """Write a terminal status (no version) while we still hold the job, then clean up."""
        self._delete_written()

        def apply(session: Session, job: Job) -> None:
            self._close_phase()
            job.timings = {k: round(v, 6) for k, v in self.timings.items()}
            finish_job(session, job, status, actor=self.ctx.actor, **finish)

        noun = "cancellation" if status == "cancelled" else "failure"
        try:
            ok = self._fenced_update(apply)
        except Exception as exc:
            log.warning("job %s: could not record %s: %s", self.job_id, noun, exc)
            return RunResult(Outcome.RETRY, self.job_id, detail=f"{noun} not recorded: {exc}")
        if not ok:
            return RunResult(Outcome.LOST, self.job_id, detail=f"lost before {noun} was recorded")
        cleanup_job_checkpoints(self.ctx.storage, self.model_id, self.job_id)
        return RunResult(outcome, self.job_id, detail=detail)

    def _retry_or_fail(self, exc: BaseException) -> RunResult:
        self._delete_written()
        problem = transient_problem(exc)
        max_attempts = self.ctx.settings.max_attempts
        final: list[str] = []

        def apply(session: Session, job: Job) -> None:
            if job.cancel_requested:
                finish_job(session, job, "cancelled", actor=self.ctx.actor)
                final.append("cancelled")
            elif job.attempts >= max_attempts:
                finish_job(session, job, "failed", actor=self.ctx.actor, error=problem)
                final.append("failed")
            else:
                requeue(session, job, actor=self.ctx.actor, error=problem, reason="error")

        try:
            ok = self._fenced_update(apply)
        except Exception as record_exc:
            # Most likely the database itself is down: keep the claim; the lease runs out
            # and the reaper re-queues the job once the database is back.
            log.warning("job %s: could not record the error (%s); the reaper will retry it",
                        self.job_id, record_exc)  # fmt: skip
            return RunResult(Outcome.RETRY, self.job_id, detail=str(exc))
        if not ok:
            return RunResult(Outcome.LOST, self.job_id, detail="lost before error was recorded")
        if final:
            cleanup_job_checkpoints(self.ctx.storage, self.model_id, self.job_id)
            return RunResult(Outcome(final[0]), self.job_id, detail=str(exc))
        return RunResult(
            Outcome.RETRY, self.job_id, detail=str(exc), retry_in=retry_delay(self.attempt)
        )

    def _hand_back(self) -> RunResult:
        self._delete_written()

        def apply(session: Session, job: Job) -> None:
            job.attempts = max(0, job.attempts - 1)  # a shutdown is not the job's fault
            requeue(session, job, actor=self.ctx.actor, error=None, reason="worker shutdown")

        try:
            self._fenced_update(apply)
        except Exception as exc:
            log.warning("job %s: could not hand the job back: %s", self.job_id, exc)
        return RunResult(Outcome.INTERRUPTED, self.job_id)


def retry_delay(attempt: int) -> float:
    return float(min(60, 2**attempt))


def requeue(
    session: Session, job: Job, *, actor: str, error: dict[str, Any] | None, reason: str
) -> None:
    """Put a running job back in the queue (its attempts are kept)."""
    job.status = "queued"
    job.worker_id = None
    job.lease_expires_at = None
    job.phase = None
    job.progress = 0.0
    if error is not None:
        job.error = error
    request = session.get(DeletionRequest, job.request_id)
    if request is not None:
        request.status = "queued"
    append_event(
        session, actor=actor, action="job.requeued", subject_type="job", subject_id=job.id,
        payload={"attempts": job.attempts, "reason": reason,
                 **({"error": error.get("detail")} if error else {})},
    )  # fmt: skip


def _is_time_limit(exc: BaseException) -> bool:
    return type(exc).__name__ in {"SoftTimeLimitExceeded", "TimeLimitExceeded"}


# --------------------------------------------------------------------------- entry point


def run_job(ctx: RunnerContext, job_id: str) -> RunResult:
    """Claim and run one job; safe to call for any job id, any number of times."""
    claim = claim_job(ctx, job_id)
    if claim.outcome is not None:
        result = RunResult(claim.outcome, job_id, detail=claim.detail)
    else:
        log.info("job %s: claimed (attempt %d) by %s", job_id, claim.attempt, ctx.worker_id)
        result = _Execution(ctx, claim).run()
        log.info("job %s: %s %s", job_id, result.outcome.value, result.detail)
    if result.outcome in (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELLED):
        wake_next(ctx, claim.model_id)
    return result


def wake_next(ctx: RunnerContext, model_id: str) -> None:
    """Tell the executor that the model's next queued job may start now."""
    if ctx.wake is None or not model_id:
        return
    try:
        with transaction(ctx.session_factory) as session:
            nxt = next_runnable_of_model(session, model_id)
        if nxt is not None:
            ctx.wake(nxt)
    except Exception as exc:  # the reaper re-sends lost wake-ups
        log.warning("model %s: could not wake the next job: %s", model_id, exc)
