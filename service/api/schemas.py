"""Response shapes, declared for the OpenAPI document (clients rely on these fields).

`extra="allow"` keeps additional informative fields in responses without listing each one.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class Page(_Out, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


class DatasetOut(_Out):
    id: str
    name: str
    kind: str = Field(description="tensor | text")
    role: str = Field(description="train | eval | member_probe")
    record_count: int
    sha256: str = Field(description="sha256 of the file as uploaded")
    created_at: str


class RecordOut(_Out):
    key: str
    state: str = Field(description="present | forgotten")
    forgotten_at: str | None


class VersionOut(_Out):
    id: str
    model: str
    number: int
    parent_id: str | None
    job_id: str | None
    status: str = Field(description="active | candidate | superseded | rejected")
    sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    created_at: str
    retired_at: str | None = Field(
        default=None, description="When the checkpoint was deleted (downloads then answer 410)."
    )


class ModelOut(_Out):
    id: str
    name: str
    architecture: str
    arch_kwargs: dict[str, Any]
    active_version: VersionOut | None


class JobOut(_Out):
    id: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    phase: str | None = Field(description="loading | influence | unlearning | evaluating | saving")
    progress: float = Field(description="0..1")
    attempts: int
    error: dict[str, Any] | None = Field(description="A problem object when the job failed.")
    source_version_id: str | None
    result_version_id: str | None
    metrics: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None


class JobRef(_Out):
    id: str
    status: str


class SubmissionOut(_Out):
    id: str
    status: str
    job: JobRef


class DeletionRequestOut(_Out):
    id: str
    status: str = Field(
        description="queued | running | needs_review (result held by the release policy) | "
        "completed (a version without the records is active) | failed | cancelled | rejected"
    )
    model: str
    dataset: str
    record_keys: list[str]
    method: str
    params: dict[str, Any]
    job: JobOut | None


class AuditEventOut(_Out):
    seq: int
    time: str
    actor: str
    action: str
    subject_type: str
    subject_id: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class CheckpointOut(_Out):
    seq: int
    hash: str
    time: str
    kid: str


class VerifyOut(_Out):
    ok: bool
    checked: int
    head_hash: str
    first_bad_seq: int | None
    reason: str | None = None
    checkpoints: int = 0
    latest_checkpoint: CheckpointOut | None = None


class ProblemOut(_Out):
    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


# Error responses every /v1 route may give, for the OpenAPI document.
PROBLEM_CONTENT = {"application/problem+json": {"schema": ProblemOut.model_json_schema()}}
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key", "content": PROBLEM_CONTENT},
    403: {"description": "The key's scope is insufficient", "content": PROBLEM_CONTENT},
    422: {
        "description": "Invalid input (the `errors` list names fields or keys)",
        "content": PROBLEM_CONTENT,
    },
}
