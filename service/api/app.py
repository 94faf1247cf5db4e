"""FastAPI application factory: `create_app(settings=None)`."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service import __version__
from service.api import (
    audit_routes,
    console_routes,
    dataset_routes,
    health,
    job_routes,
    model_routes,
    request_routes,
)
from service.api.auth import KeyCache, authenticate
from service.api.deps import AppState, check_request_strings
from service.api.gate import FORM_OVERHEAD_BYTES, RequestGate
from service.api.observability import Metrics, MetricsMiddleware
from service.api.openapi import install_openapi, operation_id
from service.api.problems import install_handlers
from service.api.request_ids import RequestIdMiddleware
from service.settings import Settings, get_settings
from service.storage.async_reads import AsyncReads
from service.storage.db import is_postgres, make_engine, make_session_factory
from service.storage.migrate import SchemaBehind, check_at_head
from service.storage.objects import Storage
from service.storage.watchdog import add_statement_watchdog

log = logging.getLogger("lethe.api")

PG_POOL = 20
PG_ASYNC_POOL = 4  # a poll holds its connection for one round trip

DESCRIPTION = """
Lethe makes trained PyTorch models forget data on request using IMU (Influence-guided
Machine Unlearning). Register datasets and model checkpoints, POST a deletion request naming
record keys, poll the job, download the new checkpoint.

* Auth: `Authorization: Bearer <key>` on every `/v1` route; scopes `read` < `submit` < `admin`.
* Errors: `application/problem+json` (RFC 9457) with a stable `type` URI under
  `https://lethe.dev/problems/`, `title`, `status`, `detail` and `errors` for validation.
* Lists: `{items, next_cursor}`; pass `cursor=<next_cursor>` for the next page.
"""


def _warm_up(state: AppState) -> None:
    """Pay one-time costs at start-up, not on the first request: submission checks IMU params
    with the engine's config (importing torch, seconds), and the pool opens a connection."""
    from service.domain.params import validate_params

    validate_params("imu", {})
    try:
        with state.sessions() as session:
            authenticate(session, "lethe_warm-up")
    except Exception as exc:  # a database blip must not stop a worker process from starting
        log.warning("start-up: database not reachable yet (%s)", str(exc).splitlines()[0][:200])
    # Beside the start, not in it: a broker that is slow to answer must not delay serving.
    threading.Thread(target=_connect_queue, args=(state.settings,), daemon=True).start()


def _connect_queue(settings: Settings) -> None:
    from service.domain.queue import get_queue

    try:
        get_queue(settings).connect()
    except Exception as exc:  # the first submission connects (and retries) on its own
        log.warning("start-up: broker not reachable yet (%s)", str(exc).splitlines()[0][:200])


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Sync endpoints run in a thread pool (40 threads) and hold a connection for milliseconds.
    # Pooled connections stay open: overflow ones were closed and reopened (with their PRAGMAs)
    # under load. PostgreSQL: 20 per process (the thread pool's and the polls' own, on the
    # loop) keeps `lethe serve`'s workers (≤ 4) under the server's default max_connections of
    # 100; SQLite connections are cheap, one per thread.
    engine_kwargs: dict[str, object] = {"max_overflow": 0, "pool_timeout": 30}
    if settings.db_url.startswith("postgresql"):
        # A short connect timeout: with the database unreachable a request answers 503 within
        # seconds instead of hanging a worker thread.
        # Keepalives and tcp_user_timeout notice a network that drops packets; the server
        # ends statements past the bound; the watchdog (below) covers a peer that never
        # answers. Together: during an outage every request answers 503 within ~10 s.
        bound_ms = int(settings.db_timeout_s * 1000)
        engine_kwargs.update(
            pool_size=PG_POOL - PG_ASYNC_POOL,
            connect_args={
                "connect_timeout": 5,
                "keepalives": 1,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 2,
                "tcp_user_timeout": bound_ms,
                "options": f"-c statement_timeout={bound_ms}",
            },
        )
    else:
        engine_kwargs.update(pool_size=40)
    engine = make_engine(settings.db_url, **engine_kwargs)
    async_reads = None
    if is_postgres(engine):
        add_statement_watchdog(engine, settings.db_timeout_s)
        connect_args = engine_kwargs["connect_args"]
        assert isinstance(connect_args, dict)
        async_reads = AsyncReads(
            engine.url, connect_args, bound_s=settings.db_timeout_s, size=PG_ASYNC_POOL
        )
    state = AppState(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        storage=Storage.from_settings(settings),
        metrics=Metrics(),
        keys=KeyCache(settings.auth_cache_seconds),
        inline_reads=not is_postgres(engine),
        async_reads=async_reads,
    )
    state.metrics.watch_jobs(state)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Refuse to serve a database behind the migration head (run `lethe migrate`). One that
        # cannot be reached is served anyway (503 until it is back, /readyz says so): a blip
        # while one of `lethe serve`'s worker processes starts used to stop the whole server.
        try:
            check_at_head(engine)
        except SchemaBehind:
            raise
        except Exception as exc:
            log.warning(
                "start-up: database not reachable (%s); answering 503 until it is back",
                str(exc).splitlines()[0][:200],
            )
        # Temporary files of a process killed mid-write (this one, before a restart, or another).
        state.storage.sweep_temp(settings.temp_max_age_s)
        _warm_up(state)
        if async_reads is not None:
            await async_reads.open()
        log.info(
            "lethe %s serving (%s, %s)",
            __version__,
            "postgresql" if is_postgres(engine) else "sqlite",
            "embedded executor" if settings.embedded else "broker",
        )
        yield
        if async_reads is not None:
            await async_reads.close()
        engine.dispose()

    app = FastAPI(
        title="Lethe",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # Every route: strings PostgreSQL cannot store are a 422 naming the field, not a 500.
        dependencies=[Depends(check_request_strings)],
        generate_unique_id_function=operation_id,
    )
    app.state.lethe = state
    install_handlers(app)
    install_openapi(app)
    for router in (
        dataset_routes.router,
        model_routes.router,
        request_routes.router,
        job_routes.router,
        audit_routes.router,
        health.router,
        audit_routes.jwks_router,
        console_routes.router,
    ):
        app.include_router(router)
    app.mount("/console/static", console_routes.static_files(), name="console-static")
    app.add_middleware(
        RequestGate,
        upload_limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        json_limit=settings.max_json_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    # Added last, so outermost: the gate's and the handlers' log lines carry the id too.
    app.add_middleware(RequestIdMiddleware)

    @app.get("/", include_in_schema=False)
    def root() -> dict[str, str]:
        return {"name": "lethe", "version": __version__, "docs": "/docs"}

    return app


__all__ = ["create_app"]
