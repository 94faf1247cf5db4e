"""The one retry backoff: exponential, capped, optionally jittered. Used for job retries,
the reaper's re-sends and the embedded executor's loop (Celery's own ``retry_backoff`` and
``retry_jitter`` do the same for messages, worker/tasks.py)."""

from __future__ import annotations

import random

JITTER = 0.5  # a retry waits between half and all of its backoff: failures spread out


def backoff_delay(
    attempt: int, *, base: float = 1.0, cap: float = 60.0, jitter: float = 0.0
) -> float:
    """`base · 2**attempt` seconds, at most `cap` (attempt 0 → base); with ``jitter`` j, a
    uniform share in [1 − j, 1] of that, so that retries of one outage do not arrive together."""
    delay = float(min(cap, base * 2 ** max(0, attempt)))
    return delay * (1.0 - jitter * random.random()) if jitter else delay
