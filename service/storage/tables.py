"""SQLAlchemy ORM models: the schema contract shared by the API and the worker.

Only ever changed together with an Alembic migration in migrations/versions/.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from service.domain.states import JobStatus, RecordState, RequestStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC datetime in Python. SQLite drops the zone on
    the way in and hands back naive values; PostgreSQL keeps it: both read back as UTC here,
    so no caller has to fix zones. Same DDL as DateTime(timezone=True): no migration."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _to_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _to_utc(value)


def _to_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    scope: Mapped[str] = mapped_column(String(16))  # read | submit | admin
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # tensor | text
    role: Mapped[str] = mapped_column(String(16))  # train | eval | member_probe
    record_count: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # of the file as uploaded
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(500))  # current file (rewritten on purge)
    content_sha256: Mapped[str] = mapped_column(String(64))  # of the current file
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)  # input shape, dtype, labels
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Record(Base):
    __tablename__ = "records"
    __table_args__ = (
        UniqueConstraint("dataset_id", "key", name="uq_records_dataset_key"),
        Index("ix_records_dataset_state", "dataset_id", "state"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(500))
    row: Mapped[int] = mapped_column(Integer)  # row in the file as uploaded
    content_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=RecordState.PRESENT)
    forgotten_at: Mapped[datetime | None] = mapped_column(default=None)
    forgotten_by_job_id: Mapped[str | None] = mapped_column(String(36), default=None)
    # Set once the record's content is gone from the dataset file (key and sha256 remain).
    purged_at: Mapped[datetime | None] = mapped_column(default=None)
    # The last deletion request that named the record. It holds the record while that request
    # is queued, running or awaiting review (the request's status says so; nothing clears it).
    held_by_request_id: Mapped[str | None] = mapped_column(String(36), default=None)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    architecture: Mapped[str] = mapped_column(String(200))
    arch_kwargs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    description: Mapped[str | None] = mapped_column(Text, default=None)
    eval_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), default=None)
    member_probe_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id"), default=None
    )
    # How version 1 was trained (worker.imu.recipe.Recipe as JSON); None = no exact route.
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The model's submission counter: jobs.submitted_seq is a position in this model's line.
    job_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "number", name="uq_versions_model_number"),
        # At most one active version per model (migration 0005).
        Index(
            "uq_versions_one_active",
            "model_id",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"), default=None)
    # A job produces at most one version: this constraint makes a duplicate impossible.
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", use_alter=True, name="fk_versions_job"), unique=True, default=None
    )
    storage_key: Mapped[str | None] = mapped_column(String(500), default=None)  # None = retired
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # active|candidate|superseded|rejected
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    superseded_at: Mapped[datetime | None] = mapped_column(default=None)
    retired_at: Mapped[datetime | None] = mapped_column(default=None)


class DeletionRequest(Base):
    __tablename__ = "deletion_requests"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    record_keys: Mapped[list[Any]] = mapped_column(default=list)
    method: Mapped[str] = mapped_column(String(16))  # imu | ga | retrain
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    subject_ref: Mapped[str | None] = mapped_column(String(500), default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    # queued | running | needs_review | completed | failed | cancelled | rejected
    # (service/domain/lifecycle.py; the schema limits it, migration 0005)
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.QUEUED)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, default=None)
    body_sha256: Mapped[str] = mapped_column(String(64))  # to tell a retry from a reuse
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_model_status", "model_id", "status"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_served_by", "served_by_job_id"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), unique=True)
    # Set while another job (the leader) serves this one's request in a coalesced run.
    served_by_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", name="fk_jobs_served_by"), default=None
    )
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    method: Mapped[str] = mapped_column(String(16))  # a Method (service/domain/states.py)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Position in the model's line (models.job_seq); jobs of one model run in this order.
    submitted_seq: Mapped[int] = mapped_column(BigInteger, index=True)
    # The API request (X-Request-ID) that created the job; the worker logs it with the job id.
    http_request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    source_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("model_versions.id"), default=None
    )
    result_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("model_versions.id"), default=None
    )
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    phase: Mapped[str | None] = mapped_column(String(16), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    device: Mapped[str | None] = mapped_column(String(32), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditHead(Base):
    """Single row holding the chain head; locking it serialises appends so seq has no gaps."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_subject", "subject_type", "subject_id"),)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class Counter(Base):
    """Named monotonically increasing counters (e.g. job submission order)."""

    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
