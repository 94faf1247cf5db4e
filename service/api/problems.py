"""RFC 9457 problem details: one exception type, stable type URIs and the FastAPI handlers.

Every error the API returns is `application/problem+json` with `type`, `title`, `status`,
`detail` and, for validation problems, `errors` naming the offending fields or keys. Unhandled
exceptions become a 500 without any internal detail (the traceback goes to the log only).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

PROBLEM_BASE = "https://lethe.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

log = logging.getLogger("lethe.api")

# Slugs used for plain HTTP errors raised by the framework (404 route, 405 method ...).
_STATUS_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    411: "length-required",
    413: "payload-too-large",
    415: "unsupported-media-type",
    416: "range-not-satisfiable",
    422: "validation-error",
    429: "too-many-requests",
    500: "internal-error",
    503: "service-unavailable",
}


def type_uri(slug: str) -> str:
    return slug if slug.startswith(("http://", "https://", "about:")) else PROBLEM_BASE + slug


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
        "title": title or _default_title(status),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extra)
    return body


def _default_title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(StarletteHTTPException):
    """Raise anywhere in request handling to answer with a problem document.

    It subclasses Starlette's HTTPException so that FastAPI re-raises it unchanged when it
    happens while the request body is being read (e.g. the upload size limit).
    """

    def __init__(
        self,
        status: int,
        type: str,
        detail: str = "",
        *,
        title: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.status = status
        self.type = type_uri(type)
        self.title = title or _default_title(status)
        self.errors = errors
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return problem_dict(
            self.type, self.title, self.status, str(self.detail), self.errors, **self.extra
        )


# Convenience constructors for the common cases, so routers stay one-liners.
def did_you_mean(ident: str, known: Sequence[str]) -> tuple[list[str], str]:
    """The names closest to ``ident`` and the sentence suggesting them ("" when none)."""
    close = difflib.get_close_matches(ident, list(known), n=3, cutoff=0.6)
    return close, (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")


def not_found(what: str, ident: str, known: Sequence[str] = ()) -> Problem:
    """404; with ``known`` names, the closest ones are suggested."""
    close, hint = did_you_mean(ident, known)
    problem = Problem(404, "not-found", f"{what} {ident!r} does not exist{hint}", title="Not found")
    if close:
        problem.extra["suggestions"] = close
    return problem


def validation(detail: str, errors: list[dict[str, Any]] | None = None) -> Problem:
    return Problem(422, "validation-error", detail, title="Invalid input", errors=errors or [])


def conflict(slug: str, detail: str, title: str = "Conflict", **extra: Any) -> Problem:
    return Problem(409, slug, detail, title=title, **extra)


def problem_response(
    body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        body, status_code=body["status"], media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        # Drop the "body"/"query" prefix for the field name but keep where it came from.
        where = loc[0] if loc else "request"
        field = ".".join(loc[1:]) if len(loc) > 1 else where
        out.append({"field": field, "in": where, "message": err.get("msg", "invalid")})
    return out


async def _handle_problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.to_dict(), exc.headers)


async def _handle_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc)
    fields = ", ".join(sorted({e["field"] for e in errors}))
    body = problem_dict(
        "validation-error", "Invalid input", 422, f"invalid request: {fields}", errors
    )
    return problem_response(body)


async def _handle_http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else _default_title(status)
    body = problem_dict(_STATUS_SLUGS.get(status, f"http-{status}"), None, status, detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 405:
        headers["Allow"] = _allowed_methods(_request)
    return problem_response(body, headers or None)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette names only the first route
    whose path matched, but GET and POST of one path are often separate routes."""
    # Ask the router per method: included routers nest routes, so probing beats walking them.
    methods = {
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    }
    return ", ".join(sorted(methods))


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = problem_dict(
        "internal-error",
        "Internal server error",
        500,
        "the server failed to handle this request; the error has been logged",
    )
    return problem_response(body)


# Seconds a client should wait before retrying while the database is unreachable.
DB_RETRY_AFTER_S = 5


def database_unavailable() -> dict[str, Any]:
    return problem_dict(
        "database-unavailable",
        "Database unavailable",
        503,
        "the service cannot reach its database; retry later",
    )


async def _handle_database(request: Request, exc: Exception) -> JSONResponse:
    # Only connection-level failures are a 503; any other driver error is a bug (500).
    if (
        isinstance(exc, sa_exc.DBAPIError)
        and not isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
        and not exc.connection_invalidated
    ):
        return await _handle_unexpected(request, exc)
    # The driver's message names host and port: log it, never send it.
    log.error(
        "database unavailable on %s %s: %s",
        request.method,
        request.url.path,
        str(exc).splitlines()[0][:300],
    )
    return problem_response(database_unavailable(), {"Retry-After": str(DB_RETRY_AFTER_S)})


STORAGE_RETRY_AFTER_S = 60  # a full disk or bucket needs an operator: not seconds


async def _handle_storage_full(request: Request, exc: Exception) -> JSONResponse:
    log.error("storage full on %s %s: %s", request.method, request.url.path, exc)
    body = problem_dict(
        "storage-full", "Insufficient storage", 507,
        "the object store has no room for this upload; nothing was stored, retry later",
    )  # fmt: skip
    return problem_response(body, {"Retry-After": str(STORAGE_RETRY_AFTER_S)})


def install_handlers(app: FastAPI) -> None:
    from service.storage.objects import StorageFull

    app.add_exception_handler(StorageFull, _handle_storage_full)
    # Pool exhaustion (TimeoutError) and a dropped connection both mean "come back later".
    for exc_type in (sa_exc.DBAPIError, sa_exc.TimeoutError, sa_exc.DisconnectionError):
        app.add_exception_handler(exc_type, _handle_database)
    app.add_exception_handler(Problem, _handle_problem)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(Exception, _handle_unexpected)
