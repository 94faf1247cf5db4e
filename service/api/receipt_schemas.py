"""The erasure receipt's shapes (`GET /v1/deletion-requests/{id}/receipt`): the signed
payload, field for field, so the unsigned copy a client reads equals what was signed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from service.api.schemas import PolicyDecision, _Out
from service.domain.states import RequestStatus


class ReceiptRequest(_Out):
    id: str
    model: str
    model_id: str
    dataset: str
    dataset_id: str
    subject_ref: str | None
    reason: str | None
    method: str
    status: RequestStatus
    created_at: str


class ReceiptRecords(_Out):
    count: int
    key_sha256: list[str]
    forgotten_at: str | None
    purged_at: str | None


class ReceiptJob(_Out):
    id: str
    finished_at: str | None
    served_by: str | None = Field(
        default=None, description="The job whose run served this one (coalesced requests)."
    )


class ReceiptForgetting(_Out):
    kind: Literal["approximate", "exact"]
    method: str | None = Field(description="The method whose result was released.")
    evidence: dict[str, Any] | None = Field(
        description="The membership test's summary (MembershipEvidence without per_record_z)."
    )
    attempts: list[str] = Field(description="Methods tried, in order.")
    recipe_sha256: str | None = Field(
        default=None, description="exact: the recipe the model was retrained by."
    )


class VersionDigest(_Out):
    id: str
    number: int
    sha256: str


class ReceiptMetrics(_Out):
    before: dict[str, Any]
    after: dict[str, Any]
    policy: PolicyDecision | None


class ReceiptCheckpoint(_Out):
    seq: int
    hash: str
    time: str
    kid: str
    jws: str


class ReceiptAudit(_Out):
    first_seq: int | None
    last_seq: int | None
    events: int
    head_seq: int
    head_hash: str | None
    checkpoint: ReceiptCheckpoint


class Issuer(_Out):
    service: str
    version: str


class ReceiptPayload(_Out):
    type: str
    iss: str = Field(description="JWT issuer (RFC 7519).")
    sub: str = Field(description="JWT subject: the deletion request's id.")
    aud: str = Field(description="JWT audience: urn:lethe:erasure-receipt.")
    iat: int = Field(description="JWT issued-at (seconds since the epoch).")
    request: ReceiptRequest
    records: ReceiptRecords
    job: ReceiptJob
    source_version: VersionDigest
    result_version: VersionDigest
    forgetting: ReceiptForgetting
    metrics: ReceiptMetrics
    audit: ReceiptAudit
    issued_at: str
    issuer: Issuer


class ReceiptOut(_Out):
    jws: str = Field(description="The receipt: a compact JWS (EdDSA); verifiers read this.")
    kid: str
    payload: ReceiptPayload = Field(description="Unsigned copy of the JWS payload.")
