"""/healthz (process up), /readyz (database at head; broker reported, not required), /metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from service.api.deps import AppState, get_state, metrics_access
from service.api.problems import DB_RETRY_AFTER_S, problem_response
from service.api.rendering import render
from service.api.schemas import HealthOut, ReadyOut, problems
from service.errors import problem_dict
from service.storage.migrate import SchemaBehind, check_at_head

log = logging.getLogger("lethe.api")
READY_TIMEOUT_S = 3.0  # the probe answers within this, whatever the database does
router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers", response_model=HealthOut)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(state: AppState) -> str:
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        check_at_head(state.engine)
    except SchemaBehind:
        return "migration-pending"
    except Exception as exc:  # the driver's message (host, port) goes to the log only
        log.warning("readiness: database check failed: %s", str(exc).splitlines()[0][:300])
        return "unavailable"
    return "ok"


def _check_broker(state: AppState) -> bool:
    url = state.settings.broker_url
    if not url.startswith(("redis://", "rediss://")):
        return True  # a transport this check does not know how to ping
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        client.ping()
    except Exception as exc:
        log.warning("readiness: broker check failed: %s: %s", type(exc).__name__, exc)
        return False
    finally:
        client.close()
    return True


@router.get(
    "/readyz",
    summary="Readiness: 503 only when this instance cannot serve requests (database down)",
    description=(
        "`checks` says, per dependency, `ok` or `unavailable` (the database also "
        "`migration-pending`, the broker `embedded`); details go to the server log only. "
        "The database down, or behind the migration head: 503 (take the instance out of the "
        "load balancer). Only the broker down: 200 with `status: degraded`: submissions are "
        "still accepted, stored as queued and dispatched once the broker is back, so keep "
        "routing to the instance and alert on the broker instead."
    ),
    response_model=ReadyOut,
    responses=problems(503, _503="Not ready: the database is down or behind the migration head"),
)
async def readyz(state: AppState = Depends(get_state)) -> Response:
    # Its own deadline: a database that stopped answering must not hold the probe (it did,
    # 90 s); the thread left behind ends when the statement watchdog severs its connection.
    try:
        database = await asyncio.wait_for(
            run_in_threadpool(_check_database, state), timeout=READY_TIMEOUT_S
        )
    except TimeoutError:
        log.warning("readiness: database check took over %s s", READY_TIMEOUT_S)
        database = "unavailable"
    checks: dict[str, Any] = {"database": database}
    if state.settings.embedded:
        checks["broker"] = "embedded"
    else:
        broker_ok = await run_in_threadpool(_check_broker, state)
        checks["broker"] = "ok" if broker_ok else "unavailable"
    if checks["database"] != "ok":
        detail = (
            "the database schema is behind the migration head: run `lethe migrate`"
            if checks["database"] == "migration-pending"
            else "database unavailable"
        )
        body = problem_dict(
            "not-ready",
            "Not ready",
            503,
            detail,
            checks=checks,
            reasons=[f"{name} {v}" for name, v in checks.items() if v not in ("ok", "embedded")],
        )
        return problem_response(body, {"Retry-After": str(DB_RETRY_AFTER_S)})
    status = "ready" if checks["broker"] != "unavailable" else "degraded"
    return render(ReadyOut, {"status": status, "checks": checks})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Scope `read` (a Bearer key; Prometheus sends one with `authorization`), "
    "or open to all with LETHE_METRICS_AUTH=open.",
    dependencies=[Depends(metrics_access)],
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {}}},
        **problems(401, 403, 503),
    },
)
def metrics(state: AppState = Depends(get_state)) -> Response:
    from service.api.observability import render

    body, content_type = render(state)
    return Response(body, media_type=content_type)
