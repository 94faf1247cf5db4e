"""/healthz (process up), /readyz (database at head, broker reachable), /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from service.api.deps import AppState, get_state
from service.migrate import check_at_head
from service.problems import PROBLEM_MEDIA_TYPE, problem_dict

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(state: AppState) -> str | None:
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        check_at_head(state.engine)
    except Exception as exc:  # any failure means not ready; say why
        return f"database: {exc}".splitlines()[0][:500]
    return None


def _check_broker(state: AppState) -> str | None:
    url = state.settings.broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None  # embedded, or a transport this check does not know how to ping
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        client.ping()
    except Exception as exc:
        return f"broker: {type(exc).__name__}: {exc}"[:500]
    finally:
        client.close()
    return None


@router.get(
    "/readyz",
    summary="Readiness: database reachable and at the migration head, broker reachable",
    responses={503: {"content": {PROBLEM_MEDIA_TYPE: {}}}},
)
def readyz(state: AppState = Depends(get_state)) -> JSONResponse:
    checks: dict[str, Any] = {}
    reasons = []
    db = _check_database(state)
    checks["database"] = "ok" if db is None else "failed"
    if db:
        reasons.append(db)
    if state.settings.embedded:
        checks["broker"] = "embedded"
    else:
        broker = _check_broker(state)
        checks["broker"] = "ok" if broker is None else "failed"
        if broker:
            reasons.append(broker)
    if reasons:
        body = problem_dict(
            "not-ready", "Not ready", 503, "; ".join(reasons), checks=checks, reasons=reasons
        )
        return JSONResponse(body, status_code=503, media_type=PROBLEM_MEDIA_TYPE)
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(state: AppState = Depends(get_state)) -> Response:
    from service.observability import render

    body, content_type = render(state)
    return Response(body, media_type=content_type)
