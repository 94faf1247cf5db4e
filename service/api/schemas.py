"""Response shapes: one Out model per resource, the only shape any route answers with.

Every route validates its answer with its model (`response_model`, or `rendering.render` on
the hot paths), so the OpenAPI document is the whole answer: resources forbid undeclared
fields (a view that grows a field fails the tests until it is declared here). Documents the
worker stored inside a job's metrics (the policy decision, the membership evidence) were
written by whichever version ran the job: they keep the declared fields and drop the rest.
Status fields are the lifecycle enums of service.domain.states. Error responses share one
`Problem` component (RFC 9457, service.errors.Problem), declared per operation with
`problems(...)`. The erasure receipt's shapes are in `receipt_schemas`.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from service.domain.states import (
    DatasetKind,
    DatasetRole,
    JobStatus,
    Method,
    Phase,
    RecordState,
    RequestStatus,
    VersionStatus,
)

T = TypeVar("T")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Stored(BaseModel):
    # Answers never carry an undeclared field either way: ignored keys are not serialised.
    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})


class Page(_Out, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


class DatasetOut(_Out):
    id: str
    name: str
    kind: DatasetKind
    role: DatasetRole
    record_count: int
    sha256: str = Field(description="sha256 of the file as uploaded")
    content_sha256: str = Field(
        description="sha256 of the file as stored now (differs from `sha256` after a purge)"
    )
    size_bytes: int
    meta: dict[str, Any] = Field(description="What the file holds: input shape, dtype, labels.")
    created_at: str
    state_counts: dict[RecordState, int] | None = Field(
        default=None, description="Records per state (`GET` of one dataset only)."
    )


class RecordOut(_Out):
    key: str
    row: int = Field(description="Position in the dataset file as uploaded.")
    state: RecordState
    sha256: str = Field(description="sha256 of the record's content (its tensor or text).")
    forgotten_at: str | None
    purged_at: str | None = Field(description="When its content left the stored file.")


class PolicyCheck(_Stored):
    name: str = Field(
        description="eval_acc_drop | forget_acc | membership | membership_per_request "
        "(classifiers); forget_recall | forget_indistinguishable | heldout_ppl_rise | "
        "probe_recall_drop (LMs)"
    )
    metric: str | None = Field(default=None, description="What `value` measures.")
    value: float | None = Field(
        default=None, description="The measured value; null when it was not measured."
    )
    limit: float | None = None
    ok: bool | None = Field(default=None, description="null: the check could not run (fails safe).")
    note: str | None = Field(default=None, description="Why it could not run, or how to read it.")
    outcome: str | None = Field(default=None, description="membership: the test's outcome.")
    reason: str | None = Field(default=None, description="membership: why it holds the result.")
    exact: bool | None = Field(
        default=None, description="membership: retrained exactly; evidence reported, not required."
    )
    evidence: dict[str, Any] | None = Field(
        default=None, description="membership: the test's summary (MembershipEvidence fields)."
    )
    requests: int | None = Field(
        default=None, description="membership_per_request: requests the run served."
    )
    auc: float | None = Field(default=None, description="forget_indistinguishable: min-k AUC.")
    auc_limit: float | None = None
    before: float | None = Field(default=None, description="LM checks: the value before.")
    after: float | None = Field(default=None, description="LM checks: the value after.")


class PolicyDecision(_Stored):
    """The release policy's verdict on a job's result (service.trust.policy). Only `decision`
    is required: decisions stored by older versions carry fewer fields."""

    decision: Literal["active", "candidate"] = Field(
        description="`active`: released at once; `candidate`: held for review."
    )
    mode: Literal["class", "random", "text"] | None = Field(
        default=None, description="class / random: classifier checks; text: a language model's."
    )
    class_wise: bool | None = None
    thresholds: dict[str, float | None] = Field(default_factory=dict)
    require_review: bool = False
    reason: str | None = Field(
        default=None,
        description="Why the result is held, as one code: not-forgotten-within-guard, "
        "insufficient-evidence, over-forgotten, remembered, <check>-failed, "
        "<check>-not-measured, require-review (null when released).",
    )
    checks: list[PolicyCheck] = Field(default_factory=list)
    failed: list[str] = Field(
        default_factory=list, description="Names of the checks that failed or could not run."
    )
    reasons: list[str] = Field(default_factory=list, description="One sentence per failed check.")


class VersionAncestor(_Out):
    id: str
    number: int
    job_id: str | None


class VersionOut(_Out):
    id: str
    model: str
    number: int
    parent_id: str | None
    job_id: str | None
    status: VersionStatus
    sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    created_at: str
    superseded_at: str | None = None
    retired_at: str | None = Field(
        default=None, description="When the checkpoint was deleted (downloads then answer 410)."
    )
    checkpoint_available: bool = True
    lineage: list[VersionAncestor] | None = Field(
        default=None,
        description="`GET` of one version only: its parents, newest first, back to version 1.",
    )


class ModelOut(_Out):
    id: str
    name: str
    architecture: str
    arch_kwargs: dict[str, Any]
    description: str | None
    eval_dataset_id: str | None = Field(
        description="The held-out dataset the release policy judges utility on."
    )
    member_probe_dataset_id: str | None = Field(
        description="Language models: retained texts whose recall must survive."
    )
    recipe: dict[str, Any] | None = Field(
        default=None,
        description="How version 1 was trained (TrainingRecipe; a causal_lm: LMTrainingRecipe, "
        "its base pinned by base_sha256), datasets as ids; null = no exact route: requests "
        "are answered approximately or held.",
    )
    recipe_sha256: str | None = Field(default=None, description="What receipts cite.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Registration only: what the model is missing (e.g. no eval dataset: every "
        "request would be held) and what to do.",
    )
    created_at: str
    active_version: VersionOut | None


class JobOut(_Out):
    id: str
    request_id: str
    model: str | None
    method: Method = Field(description="The forgetting method the request asked for.")
    params: dict[str, Any] = Field(description="The request's params, as submitted.")
    status: JobStatus
    phase: Phase | None
    progress: float = Field(description="0..1")
    attempts: int
    error: dict[str, Any] | None = Field(description="A problem object when the job failed.")
    cancel_requested: bool = Field(description="A cancel was asked for while it ran.")
    source_version_id: str | None
    result_version_id: str | None
    served_by: str | None = Field(
        default=None,
        description="The job whose run serves this one (coalesced requests: one run forgets "
        "the union of their records; each keeps its own evidence and receipt).",
    )
    result_version_status: VersionStatus | None = Field(
        default=None,
        description="Status of the version the job produced: `active` (released), "
        "`candidate` (held for review), `rejected`, `superseded`.",
    )
    policy: PolicyDecision | None = Field(
        default=None, description="The release policy's decision (also `metrics.policy`)."
    )
    metrics: dict[str, Any]
    timings: dict[str, Any] = Field(description="Seconds per phase, booked where each ran.")
    device: str | None = Field(description="Where it ran (`cpu`, `cuda:0`).")
    submitted_seq: int = Field(description="Position in the model's line of submissions.")
    created_at: str
    started_at: str | None
    finished_at: str | None


class JobRef(_Out):
    id: str
    status: JobStatus


class SubmissionOut(_Out):
    id: str
    status: RequestStatus
    job: JobRef


class VersionRef(_Out):
    id: str
    number: int
    status: VersionStatus


class MembershipEvidence(_Stored):
    """The per-record membership test of the released (or held) model (ALGORITHM.md §6)."""

    test: str
    outcome: Literal[
        "forgotten",
        "no-membership-signal",
        "remembered",
        "over-forgotten",
        "insufficient-evidence",
    ]
    releases: bool
    n: int = Field(description="Records scored.")
    statistic: float = Field(description="Z = Σ z_i / √n; about N(0, 1) for unseen records.")
    limit: float = Field(description="The Z at or below which the false-release rate ≤ alpha.")
    band: list[float] = Field(description="The non-member band of Z (two-sided).")
    false_release_rate: float
    alpha: float
    advantage: float = Field(description="Remembered vs unseen distance of one record (TV).")
    max_advantage: float
    member_shift: float | None = Field(
        default=None, description="Mean z of remembered records (the test's power)."
    )
    member_sd: float | None = None
    n_members: int | None = Field(default=None, description="Reference members scored.")
    n_nonmembers: int | None = Field(default=None, description="Reference non-members scored.")
    per_record_z: list[float] = Field(description="Each record's z, in the request's order.")
    before: dict[str, Any] = Field(default_factory=dict, description="The source model's.")


class AttemptEvidence(_Stored):
    outcome: str | None = None
    n: int | None = None
    statistic: float | None = None
    limit: float | None = None
    false_release_rate: float | None = None


class RouteChoice(_Stored):
    """Why a request for an approximate method was retrained at once (worker/routing.py)."""

    method: Method = Field(description="The method the request asked for.")
    reason: Literal["cheaper"]
    approximate_s: float = Field(description="Median seconds of the model's recent tries.")
    held_share: float = Field(description="Share of those tries that were held.")
    retrain_s: float = Field(description="Seconds of the model's latest retrain.")
    runs: int = Field(description="Recent runs of the model the costs come from.")
    retrain_measured_by: str = Field(description="The job whose retrain was timed.")
    exact_first: bool


class Attempt(_Stored):
    method: Method
    outcome: Literal["released", "held"]
    reason: str | None = None
    evidence: AttemptEvidence | None = None
    seconds: float
    no_escalation: str | None = Field(
        None, description="Why a held approximate result was not retrained."
    )
    instead_of: RouteChoice | None = Field(
        None,
        description="Set when the model's measured costs sent an approximate request straight "
        "to the retrain: retraining costs no more than trying first, whose held results "
        "retrain anyway.",
    )


class DeletionRequestOut(_Out):
    id: str
    status: RequestStatus = Field(
        description="queued | running | needs_review (result held by the release policy) | "
        "completed (a version without the records is active) | failed | cancelled | rejected"
    )
    model: str
    dataset: str
    record_keys: list[str]
    method: Method
    params: dict[str, Any]
    subject_ref: str | None
    reason: str | None
    created_at: str
    result_version: VersionRef | None = Field(
        description="The version the job produced (null until it succeeded)."
    )
    policy: PolicyDecision | None = Field(description="Why the result was released or held.")
    evidence: MembershipEvidence | None = Field(
        default=None, description="Per-record membership evidence (classifiers)."
    )
    forgetting: Literal["approximate", "exact"] | None = Field(
        default=None,
        description="exact: retrained without the records by the model's recipe; approximate: "
        "IMU or gradient ascent, judged by the evidence.",
    )
    attempts: list[Attempt] | None = Field(
        default=None,
        description="Each attempt in order: method, outcome (released | held), reason, "
        "evidence summary, seconds (an escalated request lists imu, then retrain).",
    )
    job: JobOut | None


class LineageRequest(_Out):
    id: str
    status: RequestStatus
    method: str
    subject_ref: str | None
    reason: str | None
    created_at: str


class LineageEntry(VersionOut):
    deletion_request: LineageRequest | None
    record_key_sha256: list[str] = Field(
        description="sha256 of each record key the requests it served named"
    )
    records_forgotten: bool
    deletion_requests: list[str] | None = Field(
        default=None,
        description="Every request the version served (coalesced: more than one), first is "
        "`deletion_request`.",
    )


class LineageOut(_Out):
    version_id: str
    model: str
    versions: list[LineageEntry] = Field(description="Newest first, back to version 1.")


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


class JWKSOut(_Out):
    keys: list[dict[str, Any]] = Field(description="Ed25519 public keys (OKP JWKs) by `kid`.")


class HealthOut(_Out):
    status: Literal["ok"]


class ReadyOut(_Out):
    status: Literal["ready", "degraded"]
    checks: dict[str, str]


PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_PROBLEM_TEXT = {
    400: "The body could not be parsed (malformed JSON or multipart)",
    401: "Missing or invalid API key",
    403: "The key's scope is insufficient",
    404: "Not found",
    409: "Conflict with the resource's state",
    410: "Gone",
    413: "Request body too large",
    416: "Range not satisfiable",
    422: "Invalid input (the `errors` list names fields or keys)",
    503: "Database unavailable (retry after `Retry-After` seconds)",
    507: "The object store is full; nothing was stored (retry after `Retry-After` seconds)",
}


def problems(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """Problem responses for the OpenAPI document; `_409="..."` overrides a description."""
    return {
        code: {
            "description": descriptions.get(f"_{code}", _PROBLEM_TEXT[code]),
            "content": {"application/problem+json": {"schema": PROBLEM_REF}},
        }
        for code in codes
    }


# Error responses every /v1 route may give.
COMMON_ERRORS = problems(401, 403, 422, 503)
