"""What a job run needs from its process, and what a run reports back."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from service.storage.db import make_engine, make_session_factory
from service.storage.objects import Storage


@dataclass
class RunnerContext:
    """What a job needs from its process: database, storage, identity, device."""

    settings: Settings
    session_factory: sessionmaker[Session]
    storage: Storage
    worker_id: str
    wake: Callable[[str], None] | None = None  # tell an executor a job became runnable
    interrupt: threading.Event = field(default_factory=threading.Event)
    # Fault-injection seams for tests, keyed by point name ("before_save"); called with the
    # job id. Empty in production.
    hooks: dict[str, Callable[[str], None]] = field(default_factory=dict)
    _device: str | None = None

    @property
    def actor(self) -> str:
        return f"worker:{self.worker_id}"

    @property
    def device(self) -> str:
        if self._device is None:
            from worker.device import resolve_device  # imports torch: only where jobs run

            self._device = resolve_device(self.settings.device)
        return self._device

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        worker_id: str | None = None,
        wake: Callable[[str], None] | None = None,
    ) -> RunnerContext:
        from worker.lease import worker_identity

        factory = make_session_factory(make_engine(settings.db_url))
        return cls(
            settings=settings,
            session_factory=factory,
            storage=Storage.from_settings(settings),
            worker_id=worker_id or worker_identity(),
            wake=wake,
        )

    def hook(self, point: str, job_id: str) -> None:
        fn = self.hooks.get(point)
        if fn is not None:
            fn(job_id)


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"  # back to queued, or (database down) left for the reaper
    INTERRUPTED = "interrupted"  # handed back on shutdown
    LOST = "lost"  # someone else owns it
    MISSING = "missing"
    FINISHED = "finished"  # already in a final state (duplicate delivery)
    BUSY = "busy"  # running elsewhere under a live lease
    BLOCKED = "blocked"  # an earlier job of the same model is not finished


FINAL_OUTCOMES = (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELLED)


@dataclass
class RunResult:
    outcome: Outcome
    job_id: str
    detail: str = ""
    retry_in: float | None = None
    version_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "job_id": self.job_id,
            "detail": self.detail,
            "retry_in": self.retry_in,
            "version_id": self.version_id,
        }
