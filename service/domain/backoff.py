"""The one retry backoff: exponential, capped. Used for job retries, message retries, the
reaper's re-sends and the executor's reconnect loop."""

from __future__ import annotations


def backoff_delay(attempt: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """`base · 2**attempt` seconds, at most `cap` (attempt 0 → base)."""
    return float(min(cap, base * 2 ** max(0, attempt)))
