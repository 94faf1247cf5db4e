"""Domain errors: plain exceptions for what a caller did wrong or what cannot happen now.

Domain, trust, ingest and worker code raise these; they know no HTTP. The API edge
(`service.api.problems`) maps each class to a status code and renders an RFC 9457 problem
document from `code` (the problem type's slug), `title`, `detail`, `errors` and `extra`.
`Problem` (the document) and `problem_dict` are here, not at the edge, because a failed job
stores the same document as its `error` (worker.errors) without any HTTP in sight.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PROBLEM_BASE = "https://lethe.dev/problems/"


def type_uri(slug: str) -> str:
    return slug if slug.startswith(("http://", "https://", "about:")) else PROBLEM_BASE + slug


def default_title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(BaseModel):
    """An RFC 9457 problem document (`application/problem+json`): every error the API
    answers and every failed job's `error`. Extension members are declared (RFC 9457 §3.2),
    so a new one is added here or refused when the problem is built."""

    model_config = ConfigDict(extra="forbid", title="Problem")

    type: str = Field(description="Stable URI under https://lethe.dev/problems/")
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Validation problems: the offending fields or keys."
    )
    suggestions: list[str] | None = Field(default=None, description="Names close to the one given.")
    missing: list[str] | None = Field(
        default=None, description="Record keys (or weight tensors) that do not exist."
    )
    forgotten: list[str] | None = Field(default=None, description="Keys forgotten already.")
    pending: list[str] | None = Field(
        default=None, description="Keys named by a queued or running request."
    )
    in_review: list[str] | None = Field(
        default=None, description="Keys named by a request whose result awaits review."
    )
    mismatched: list[dict[str, Any]] | None = Field(
        default=None, description="Weight tensors whose shape the architecture does not give."
    )
    unexpected: list[str] | None = Field(
        default=None, description="Weight tensors the architecture does not have."
    )
    required_scope: str | None = Field(default=None, description="The scope the route needs.")
    job_status: str | None = None
    request_status: str | None = None
    version_id: str | None = None
    version_status: str | None = None
    active_version_id: str | None = None
    sha256: str | None = Field(default=None, description="Of the retired checkpoint.")
    retired_at: str | None = None
    retry_after_s: int | None = Field(default=None, description="Also the Retry-After header.")
    checks: dict[str, str] | None = Field(default=None, description="Readiness, per dependency.")
    reasons: list[str] | None = Field(
        default=None, description="Readiness: one line per failing dependency."
    )
    traceback: str | None = Field(
        default=None,
        description="A failed job's error: the last frames of the bug (API errors have none).",
    )


def problem_dict(
    type: str,
    title: str | None = None,
    status: int = 400,
    detail: str = "",
    errors: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON body of a problem; the worker stores this shape as a job's `error`."""
    if errors is not None:
        extra["errors"] = errors
    document = Problem(
        type=type_uri(type),
        title=title or default_title(status),
        status=status,
        detail=detail,
        **extra,
    )
    # Members given as null stay (a client may test for them); members not given are left out.
    return document.model_dump(mode="json", exclude_unset=True)


class DomainError(Exception):
    """Base class; the subclass says what kind of refusal it is (the edge maps it to a status).

    code: the problem type's slug (``"model-exists"``); errors: ``{"field", "message"}`` items
    naming what to fix; extra: further members of the problem document.
    """

    default_code = "bad-request"

    def __init__(
        self,
        code: str | None = None,
        detail: str = "",
        *,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.code = code or self.default_code
        self.detail = detail
        self.title = title
        self.errors = errors
        self.extra = extra


class NotFound(DomainError):
    default_code = "not-found"


class Invalid(DomainError):
    """The input breaks a rule; `errors` names the fields."""

    default_code = "validation-error"


class Conflict(DomainError):
    """The input is valid but the current state refuses it."""

    default_code = "conflict"


class PayloadTooLarge(DomainError):
    default_code = "payload-too-large"


class Unavailable(DomainError):
    """Not possible yet; retrying after ``retry_after_s`` seconds may succeed."""

    default_code = "service-unavailable"

    def __init__(self, code: str, detail: str, *, retry_after_s: int, **kwargs: Any) -> None:
        super().__init__(code, detail, retry_after_s=retry_after_s, **kwargs)
        self.retry_after_s = retry_after_s


def did_you_mean(ident: str, known: Sequence[str]) -> tuple[list[str], str]:
    """The names closest to ``ident`` and the sentence suggesting them ("" when none)."""
    close = difflib.get_close_matches(ident, list(known), n=3, cutoff=0.6)
    return close, (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")


def not_found(what: str, ident: str, known: Sequence[str] = ()) -> NotFound:
    """With ``known`` names, the closest ones are suggested."""
    close, hint = did_you_mean(ident, known)
    error = NotFound("not-found", f"{what} {ident!r} does not exist{hint}", title="Not found")
    if close:
        error.extra["suggestions"] = close
    return error


def validation(detail: str, errors: list[dict[str, Any]] | None = None) -> Invalid:
    return Invalid("validation-error", detail, title="Invalid input", errors=errors or [])


def conflict(slug: str, detail: str, title: str = "Conflict", **extra: Any) -> Conflict:
    return Conflict(slug, detail, title=title, **extra)
