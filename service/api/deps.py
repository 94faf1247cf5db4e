"""Dependencies shared by the routers: app state, authentication and scope checks."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.auth import KeyCache, Principal
from service.api.problems import HTTPProblem
from service.ingest.textcheck import find_bad, problem
from service.settings import Settings
from service.storage.async_reads import AsyncReads
from service.storage.objects import CHUNK, Storage


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    metrics: Any = None
    keys: KeyCache = field(default_factory=lambda: KeyCache(0.0))
    inline_reads: bool = False  # see `run_read`
    async_reads: AsyncReads | None = None  # PostgreSQL: polls read on the loop (no thread)


T = TypeVar("T")


async def run_read(state: AppState, fn: Callable[..., T], *args: Any) -> T:
    """Run a short read for a hot GET route.

    SQLite (WAL): readers never wait for the write lock, and the query (~0.1 ms) costs less
    than a thread-pool round trip with its GIL hand-offs, so it runs on the event loop.
    PostgreSQL: a query is a network round trip that could stall the loop; thread pool.
    """
    if state.inline_reads:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


async def get_state(request: Request) -> AppState:
    # async: a sync dependency would cost a thread-pool round trip on every request.
    return request.app.state.lethe


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


MISSING_KEY = "missing bearer API key (Authorization: Bearer <key>)"
INVALID_KEY = "invalid or revoked API key"


async def principal_for(state: AppState, secret: str) -> Principal | None:
    """The key's principal, or None. A cached key is checked on the event loop; only a
    lookup goes to the thread pool."""
    principal = state.keys.cached(secret)
    if principal is None:
        principal = await run_in_threadpool(state.keys.lookup, state.sessions, secret)
    return principal


def unauthorized(detail: str) -> HTTPProblem:
    return HTTPProblem(
        401,
        "unauthorized",
        detail,
        title="Unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="lethe"'},
    )


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """Dependency factory: a valid, unrevoked key whose scope is at least `scope`."""

    async def dependency(
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
        state: AppState = Depends(get_state),
    ) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise unauthorized(MISSING_KEY)
        principal = await principal_for(state, credentials.credentials)
        if principal is None:
            raise unauthorized(INVALID_KEY)
        if not principal.allows(scope):
            raise HTTPProblem(
                403,
                "insufficient-scope",
                f"this operation needs scope {scope!r}; the key has {principal.scope!r}",
                title="Forbidden",
                required_scope=scope,
            )
        return principal

    dependency.__name__ = f"require_{scope}"
    return dependency


def only_form_fields(*allowed: str) -> Callable[..., Any]:
    """Refuse multipart fields the endpoint does not know (FastAPI would silently drop them)."""

    async def dependency(request: Request) -> None:
        form = await request.form()  # cached: FastAPI's own parsing reuses it
        unknown = sorted(set(form.keys()) - set(allowed))
        if unknown:
            raise HTTPProblem(
                422,
                "validation-error",
                f"unknown fields: {', '.join(unknown)}",
                title="Invalid input",
                errors=[
                    {"field": name, "in": "body", "message": "unknown field"} for name in unknown
                ],
            )

    return dependency


def iter_file(fh: BinaryIO) -> Iterator[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk


_read = require("read")


async def metrics_access(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    state: AppState = Depends(get_state),
) -> None:
    """`/metrics` needs a key of scope `read` unless LETHE_METRICS_AUTH=open (a scraper on a
    private network): job counts and model names are not for anyone who can reach the port."""
    if state.settings.metrics_auth != "open":
        await _read(credentials, state)


async def check_request_strings(request: Request) -> None:
    """App-wide dependency: runs before each route's own dependencies (auth included)."""
    errors: list[dict[str, Any]] = []
    for name, value in request.path_params.items():
        if isinstance(value, str):
            find_bad(value, name, "path", errors)
    for name, value in request.query_params.multi_items():
        find_bad(name, name, "query", errors)
        find_bad(value, name, "query", errors)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        body = await request.body()  # cached on the request: FastAPI parses the same bytes
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            parsed = None  # FastAPI answers malformed JSON itself (422)
        find_bad(parsed, "", "body", errors)
    elif content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        for name, value in form.multi_items():
            find_bad(name, name, "body", errors)
            if isinstance(value, UploadFile):
                if value.filename:
                    find_bad(value.filename, f"{name}.filename", "body", errors)
            else:
                find_bad(value, name, "body", errors)
    if errors:
        raise problem(errors)
