"""RFC 9457 problem details at the API edge: the FastAPI handlers and `HTTPProblem`, the one
exception the API layer raises itself.

Every error the API returns is `application/problem+json`, one `service.errors.Problem`
document: `type`, `title`, `status`, `detail`, for validation problems `errors` naming the
offending fields or keys, and the declared extension members. Unhandled
exceptions become a 500 without any internal detail (the traceback goes to the log only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.errors import (
    Conflict,
    DomainError,
    Invalid,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    default_title,
    problem_dict,
    type_uri,
)

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


class HTTPProblem(StarletteHTTPException):
    """An HTTP-level refusal raised by the API layer itself (auth, size gate, Range): code
    below the API raises `service.errors.DomainError` instead, mapped by `_handle_domain`.

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
        self.title = title or default_title(status)
        self.errors = errors
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return problem_dict(
            self.type, self.title, self.status, str(self.detail), self.errors, **self.extra
        )


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
    assert isinstance(exc, HTTPProblem)
    return problem_response(exc.to_dict(), exc.headers)


# The one place a domain error's kind becomes an HTTP status.
DOMAIN_STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Invalid: 422,
    Conflict: 409,
    PayloadTooLarge: 413,
    Unavailable: 503,
}


def domain_status(exc: DomainError) -> int:
    for cls in type(exc).__mro__:
        if cls in DOMAIN_STATUS:
            return DOMAIN_STATUS[cls]
    return 400


def domain_problem(exc: DomainError) -> dict[str, Any]:
    return problem_dict(
        exc.code, exc.title, domain_status(exc), exc.detail, exc.errors, **exc.extra
    )


async def _handle_domain(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    retry = getattr(exc, "retry_after_s", None)
    return problem_response(domain_problem(exc), {"Retry-After": str(retry)} if retry else None)


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
    detail = exc.detail if isinstance(exc.detail, str) else default_title(status)
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
        "storage-full",
        "Insufficient storage",
        507,
        "the object store has no room for this upload; nothing was stored, retry later",
    )
    return problem_response(body, {"Retry-After": str(STORAGE_RETRY_AFTER_S)})


def install_handlers(app: FastAPI) -> None:
    from service.storage.objects import StorageFull

    app.add_exception_handler(StorageFull, _handle_storage_full)
    # Pool exhaustion (TimeoutError) and a dropped connection both mean "come back later".
    for exc_type in (sa_exc.DBAPIError, sa_exc.TimeoutError, sa_exc.DisconnectionError):
        app.add_exception_handler(exc_type, _handle_database)
    app.add_exception_handler(HTTPProblem, _handle_problem)
    app.add_exception_handler(DomainError, _handle_domain)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(Exception, _handle_unexpected)
