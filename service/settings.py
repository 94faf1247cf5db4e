"""All configuration in one pydantic-settings object (environment variables prefixed LETHE_)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine import DEVICE_NAMES, DEVICE_RE

ENV_PREFIX = "LETHE_"


class SettingsError(RuntimeError):
    """Raised at start-up when a LETHE_ variable is invalid; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True
    )

    home: Path = Field(Path("./.lethe"), description="Root for embedded state (database, storage).")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite under LETHE_HOME.")
    broker_url: str = Field("", description="Celery broker (redis://…); empty = embedded executor.")
    result_backend_url: str = Field("", description="Celery result backend; default = broker.")
    storage_url: str = Field("", description="Directory or s3:// URL; default LETHE_HOME/storage.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    max_upload_mb: int = Field(2048, gt=0, description="Largest accepted upload, in MiB.")
    db_timeout_s: float = Field(
        4.0,
        gt=0,
        le=600,
        description="PostgreSQL, API: the longest one database round trip may take (server "
        "statement_timeout, TCP user timeout and a client watchdog); past it, 503.",
    )
    max_json_mb: float = Field(
        4,
        gt=0,
        le=1024,
        description="Largest JSON (non-multipart) request body, in MiB: 100,000 record keys of "
        "up to ~36 characters fit.",
    )
    max_dataset_mb: int = Field(
        1024, gt=0, description="Largest inflated size of a tensor dataset's arrays, in MiB."
    )
    max_compression_ratio: float = Field(
        200.0, gt=1, description="Largest inflated/compressed ratio of an .npz member."
    )

    # Job execution.
    max_attempts: int = Field(3, ge=1, le=100)
    lease_seconds: float = Field(30.0, gt=0, description="A running job's lease; heartbeat renews.")
    heartbeat_seconds: float = Field(5.0, gt=0)
    reaper_interval_seconds: float = Field(5.0, gt=0)
    job_soft_time_limit_s: int = Field(3600, gt=0)
    job_hard_time_limit_s: int = Field(3900, gt=0)
    embedded_poll_seconds: float = Field(0.5, gt=0)
    queue_name: str = Field("lethe", min_length=1)

    # Retention, release policy and receipts.
    # Issue 7 names the variable LETHE_SUPERSEDED_RETENTION; the _S spelling says the unit.
    superseded_retention_s: float = Field(
        0.0,
        ge=0,
        validation_alias=AliasChoices(
            "LETHE_SUPERSEDED_RETENTION_S", "LETHE_SUPERSEDED_RETENTION", "superseded_retention_s"
        ),
        description="Seconds a superseded checkpoint is kept before deletion (0: at once).",
    )
    policy_max_eval_acc_drop: float = Field(0.05, ge=0, le=1)
    policy_max_forget_acc: float = Field(0.2, ge=0, le=1)
    policy_max_forget_auc_excess: float = Field(0.0, ge=0, le=1)
    # The per-record membership test (worker/imu/membership.py, ALGORITHM.md §6).
    policy_max_false_release_rate: float = Field(
        0.05,
        gt=0,
        le=0.5,
        description="Largest chance that records the model still remembers pass as forgotten.",
    )
    policy_max_membership_advantage: float = Field(
        0.1,
        ge=0,
        le=0.5,
        description="Largest remembered-vs-unseen distance at which an unchanged model is an "
        "honest answer (no membership signal).",
    )
    metrics_auth: Literal["read", "open"] = Field(
        "read",
        description="`/metrics`: `read` = a key of scope read (Bearer), `open` = no key.",
    )
    escalation: Literal["retrain", "off"] = Field(
        "retrain",
        description="When an approximate result would be held for a forgetting reason and the "
        "model has a training recipe: retrain without the records (exact), or hold it (off).",
    )
    exact_when_cheaper: bool = Field(
        True,
        description="Retrain first (exact) when this model's recent runs say it costs no more "
        "than trying the approximate method first, whose held results retrain anyway "
        "(worker/routing.py). Needs LETHE_ESCALATION=retrain and a recipe.",
    )
    coalesce_max_records: int = Field(
        1000,
        ge=0,
        le=100_000,
        description="Queued requests of one model that can share a run are served by one job "
        "over the union of their records, up to this many records (0 = one job per request).",
    )
    coalesce_max_records_exact: int = Field(
        10_000,
        ge=0,
        le=1_000_000,
        description="The bound for a run that retrains at once (method retrain, or the model's "
        "measured costs send it straight to the retrain): a retrain costs the same however "
        "many records it drops, so one run can serve more; what grows is how many requests "
        "one held result holds. Below LETHE_COALESCE_MAX_RECORDS it changes nothing.",
    )
    coalesce_window_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="How long a job waits after its request arrived for more requests to "
        "join it before it starts (0 = start at once; requests that arrive while a job runs "
        "still share the next one). More waiting means fewer runs but a later first answer.",
    )
    policy_membership_band: float = Field(
        0.05,
        gt=0,
        le=0.5,
        description="Two-sided level of the non-member band: a request whose Z leaves it is "
        "`remembered` (above) or `over-forgotten` (below).",
    )
    # Causal LMs (service/trust/lm_policy.py).
    policy_max_forget_recall: float = Field(0.05, ge=0, le=1)
    policy_max_heldout_ppl_rise: float = Field(0.1, ge=0, le=1)
    policy_max_probe_recall_drop: float = Field(0.1, ge=0, le=1)
    signing_key: str = Field(
        "",
        description="Ed25519 private key (PEM file) signing receipts and audit checkpoints; "
        "empty = LETHE_HOME/signing-key.pem, created once with mode 0600.",
    )
    retired_signing_keys: str = Field(
        "", description="Comma-separated PEM files of earlier keys, kept for verification."
    )
    temp_max_age_s: float = Field(
        3600.0,
        gt=0,
        description="Age after which an untouched temporary upload/checkpoint "
        "file (.tmp/*.part in storage) counts as abandoned and is removed.",
    )
    checkpoint_interval_s: float = Field(
        300.0, gt=0, description="Seconds between periodic signed audit checkpoints."
    )
    auth_cache_seconds: float = Field(
        5.0, ge=0, le=300, description="How long a checked API key is trusted (revocation bound)."
    )

    log_level: str = Field("INFO")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`text` lines, or `json`: one object per line with timestamp, level, "
        "logger, message and, where known, request_id and job_id (API and worker).",
    )
    worker_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Prometheus endpoint of a worker process (0 = off). A prefork Celery "
        "worker's pool child N listens on this port + N.",
    )
    worker_metrics_addr: str = Field(
        "0.0.0.0", min_length=1, description="Interface the worker's metrics endpoint binds."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):  # the engine's grammar: one definition
            raise ValueError(f"must be {DEVICE_NAMES}")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        if v and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("must be a sqlite:// or postgresql+psycopg:// URL")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        if v and not re.match(r"^(redis|rediss|memory|amqp)://", v):
            raise ValueError("must be a redis:// URL (or empty for the embedded executor)")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v.upper()

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.job_hard_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("LETHE_JOB_HARD_TIME_LIMIT_S must exceed LETHE_JOB_SOFT_TIME_LIMIT_S")
        return self

    # Derived values: defaults that depend on LETHE_HOME.
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'lethe.db').resolve()}"

    @property
    def storage(self) -> str:
        return self.storage_url or str((self.home / "storage").resolve())

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * 1024 * 1024)


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into one clear message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err.get("loc") or ()
            field = str(loc[0]).upper() if loc else ""
            if not field:
                name = "LETHE_* settings"
            elif field.startswith(ENV_PREFIX):  # reported under an env alias
                name = field
            else:
                name = ENV_PREFIX + field
            problems.append(f"{name}: {err['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
