"""Process-wide logging: plain text (default) or one JSON object per line (LETHE_LOG_FORMAT=json).

Every line can carry the HTTP request id and the job id it belongs to. They live in
contextvars, set by the API's request-id middleware (service.api.request_ids) and around a
job's run in the worker (worker.runner); `ContextFilter` copies them onto each record, so a
log call anywhere below needs no extra arguments. Contextvars follow a request into
Starlette's thread pool and stay within one job's thread in the worker.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("lethe_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("lethe_job_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# A client's X-Request-ID is echoed and stored, so it is bounded and plain (no log injection).
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def accept_request_id(value: str | None) -> str:
    """The client's id when it is safe to echo and store, else a fresh one."""
    if value and _REQUEST_ID_RE.match(value):
        return value
    return uuid.uuid4().hex


@contextmanager
def log_context(*, request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Attach ids to every log line emitted inside the block (this thread/task only)."""
    tokens = []
    if request_id is not None:
        tokens.append(request_id_var.set(request_id))
    if job_id is not None:
        tokens.append(job_id_var.set(job_id))
    try:
        yield
    finally:
        for token in reversed(tokens):
            token.var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the contextvars onto the record (None when unknown); never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, the ids
    where known, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def dict_config(log_format: str, level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` document: one stderr handler on the root logger, and
    uvicorn's loggers sent through it (uvicorn applies this in each of its worker processes
    when given as `log_config`)."""
    formatter: dict[str, Any] = (
        {"()": "service.logs.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "service.logs.ContextFilter"}},
        "formatters": {"lethe": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "lethe",
                "filters": ["context"],
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery")
        },
    }


def configure_logging(log_format: str, level: str) -> None:
    logging.config.dictConfig(dict_config(log_format, level))


def use_format(handler: logging.Handler, log_format: str) -> None:
    """Give a handler someone else configured (Celery's) Lethe's format and the ids."""
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())
