"""Domain errors: plain exceptions for what a caller did wrong or what cannot happen now.

Domain, trust, ingest and worker code raise these; they know no HTTP. The API edge
(`service.api.problems`) maps each class to a status code and renders an RFC 9457 problem
document from `code` (the problem type's slug), `title`, `detail`, `errors` and `extra`.
`problem_dict` is here, not at the edge, because a failed job stores the same document shape
as its `error` (worker.errors) without any HTTP in sight.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

PROBLEM_BASE = "https://lethe.dev/problems/"


def type_uri(slug: str) -> str:
    return slug if slug.startswith(("http://", "https://", "about:")) else PROBLEM_BASE + slug


def default_title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_dict(
    type: str,
    title: str | None = None,
    status: int = 400,
    detail: str = "",
    errors: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON body of a problem; the worker stores this shape as a job's `error`."""
    body: dict[str, Any] = {
        "type": type_uri(type),
        "title": title or default_title(status),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extra)
    return body


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
