"""Embedded executor: `python -m worker.embedded` runs jobs with no broker at all.

`lethe serve` starts it as a child process when LETHE_BROKER_URL is empty (the default). A
submission wakes it through a datagram socket (service.domain.queue.wake_address), so a job
starts within milliseconds; it also polls the database every `embedded_poll_seconds` for the
queued head of each model's line (lost wake-ups, jobs queued while it was down) and runs it
with the very function the Celery task uses (worker.runner.run_job), so jobs queued
while nothing ran are picked up at the next start. The reaper runs in the same loop, so a job
left `running` by an executor that was killed is re-queued at once (its pid is gone) or when
its lease expires.

SIGTERM/SIGINT: the running job stops at its next progress callback and is handed back to
`queued` without spending an attempt; the process then exits 0. A second signal exits at once.
With --watch-parent (the default) the executor also stops when its parent process goes away,
so a killed `lethe serve` never leaves an orphan executor behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from types import FrameType

from tenacity import Retrying, wait_exponential_jitter

from service.domain.queue import get_queue, wake_address
from service.logs import configure_logging
from service.settings import Settings, get_settings
from service.storage.db import transaction
from service.telemetry import queued_in_database
from worker.context import Outcome, RunnerContext, RunResult
from worker.job_queue import runnable_jobs
from worker.metrics_server import start_metrics_server
from worker.reaper import Reaper
from worker.runner import run_job

log = logging.getLogger("lethe.embedded")

SKIP = (Outcome.BLOCKED, Outcome.BUSY, Outcome.FINISHED, Outcome.MISSING)


class WakeListener:
    """The receiving end of EmbeddedQueue's datagrams. If another executor of the same
    installation holds the name (or there are no Unix sockets), waiting is plain polling."""

    def __init__(self, settings: Settings) -> None:
        self._socket: socket.socket | None = None
        if not hasattr(socket, "AF_UNIX"):
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(wake_address(settings))
        except OSError as exc:
            log.info("no wake-up socket (%s); polling only", exc)
            sock.close()
            return
        self._socket = sock

    def wait(self, stop: threading.Event, timeout: float) -> None:
        """Until a wake-up arrives, ``stop`` is set, or ``timeout`` passes."""
        if self._socket is None:
            stop.wait(timeout)
            return
        ready, _, _ = select.select([self._socket], [], [], timeout)
        if ready:
            self.drain()

    def drain(self) -> None:
        if self._socket is None:
            return
        self._socket.setblocking(False)
        try:
            while self._socket.recv(256):
                pass
        except OSError:  # nothing more queued
            pass
        finally:
            self._socket.setblocking(True)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class EmbeddedExecutor:
    def __init__(self, settings: Settings, ctx: RunnerContext | None = None) -> None:
        self.settings = settings
        self.ctx = ctx or RunnerContext.from_settings(settings)
        self.reaper = Reaper(
            settings, self.ctx.session_factory, self.ctx.storage, actor=self.ctx.actor
        )
        self.stop_event = threading.Event()
        self.wakeups = WakeListener(settings)
        self._next_reap = 0.0
        self._not_before: dict[str, float] = {}  # job id -> monotonic time (retry backoff)

    def request_stop(self) -> None:
        self.stop_event.set()
        self.ctx.interrupt.set()
        get_queue(self.settings).enqueue("stop")  # end a wait on the wake-up socket now

    def run_once(self) -> RunResult | None:
        """Reap if due, then run at most one runnable job; None when there was nothing."""
        self.wakeups.drain()  # wake-ups sent until now are answered by this pass
        now = time.monotonic()
        if now >= self._next_reap:
            self.reaper.tick()
            self._next_reap = now + self.settings.reaper_interval_seconds
        with transaction(self.ctx.session_factory) as session:
            candidates = runnable_jobs(session)
        for job_id in candidates:
            if self.stop_event.is_set():
                return None
            if self._not_before.get(job_id, 0.0) > now:
                continue
            result = run_job(self.ctx, job_id)
            if result.outcome in SKIP:
                continue
            if result.outcome == Outcome.RETRY:
                self._not_before[job_id] = time.monotonic() + (result.retry_in or 0.0)
            else:
                self._not_before.pop(job_id, None)
            return result
        return None

    def _watch_parent(self, parent: int) -> None:
        # A thread, so that a job in progress is handed back too, not only an idle loop.
        while not self.stop_event.wait(1.0):
            if os.getppid() != parent:
                log.info("parent process %d is gone; stopping", parent)
                self.request_stop()

    def _pause(self, seconds: float) -> None:
        self.stop_event.wait(seconds)

    def run_forever(self, watch_parent: bool = False, parent: int | None = None) -> None:
        """``parent``: the pid to watch, read at process start (a parent that died during the
        warm-up has already handed us to init)."""
        log.info(
            "embedded executor started (pid %d, poll %.2f s)",
            os.getpid(),
            self.settings.embedded_poll_seconds,
        )
        if watch_parent:
            threading.Thread(
                target=self._watch_parent,
                args=(parent or os.getppid(),),
                name="parent-watch",
                daemon=True,
            ).start()
        poll = self.settings.embedded_poll_seconds
        # Database not reachable or not migrated yet: retried with jittered exponential waits
        # that a stop cuts short (and a stop ends the retrying).
        retrying = Retrying(
            wait=wait_exponential_jitter(initial=poll, max=30.0, jitter=poll),
            sleep=self._pause,
            stop=lambda _state: self.stop_event.is_set(),
            before_sleep=lambda state: log.warning(
                "executor loop failed (%s); retrying", state.outcome and state.outcome.exception()
            ),
            reraise=True,
        )
        while not self.stop_event.is_set():
            try:
                result = retrying(self.run_once)
            except Exception:  # only when stopping: the loop ends below
                continue
            if result is None:
                self.wakeups.wait(self.stop_event, self.settings.embedded_poll_seconds)
        self.wakeups.close()
        log.info("embedded executor stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.embedded", description=__doc__)
    parser.add_argument(
        "--watch-parent",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop when the parent process exits (default: on)",
    )
    args = parser.parse_args(argv)
    parent = os.getppid()
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    from worker.warmup import warm_up

    warm_up()  # before the first job, not in it
    executor = EmbeddedExecutor(settings)
    sessions = executor.ctx.session_factory
    start_metrics_server(settings, sessions, ("database", queued_in_database(sessions)))
    signals_seen = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            os._exit(128 + signum)
        log.info("signal %d: finishing up", signum)
        executor.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    executor.run_forever(watch_parent=args.watch_parent, parent=parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
