"""Which route a job tries first: the request's approximate method, or the exact retrain.

Escalation (worker.forgetting) runs the approximate method and retrains only when its result
would be held, so a model whose approximate results are usually held pays for both. Where
this model's own recent runs say retraining costs no more than trying first, the job
retrains at once (``LETHE_EXACT_WHEN_CHEAPER``, on by default): exact forgetting, for less.

From the model's last ``WINDOW`` runs (jobs that were not served by another): ``a`` the median
seconds of an approximate attempt, ``p`` the share of those attempts that were held, ``r``
the latest retrain's seconds. Trying first costs ``a + p*r`` on average, retraining ``r``;
the job retrains first when ``r * (1 - p) <= a``. With no retrain or no approximate attempt
measured yet, it tries first. Runs that retrain first record no new approximate attempt, so
after ``WINDOW`` of them the window holds none and the next job measures the method again.

Size matters: one pass forgets a few records more easily than many, so an approximate attempt
held at ``n`` records says a run of at least ``n`` would be held too (``p = 1`` for it) until
a later attempt of at least as many records was released. Without this, in a burst, a
coalesced run of ~1,000 records tried first on the strength of one 3-record request's quick
release, after a 69-record run had been held, and was held and retrained too (bench/burst.py).
"""

from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.domain.states import JobStatus
from service.settings import Settings
from service.storage.tables import Job

WINDOW = 10
RETRAIN = "retrain"


def held_share(attempts: list[tuple[float, bool, int | None]], records: int | None) -> float:
    """``p`` for a run of ``records``: the share of held attempts (newest first: seconds,
    held, records), or 1 when a held attempt of at most as many records is newer than any
    release of at least as many."""
    if records is not None:
        for _seconds, held, n in attempts:
            if n is None:
                continue
            if held and n <= records:
                return 1.0
            if not held and n >= records:
                break
    return sum(held for _, held, _ in attempts) / len(attempts)


def route_costs(
    session: Session, model_id: str, records: int | None = None
) -> dict[str, Any] | None:
    """The measured costs for a run of ``records`` records, with the decision, or None when
    a cost is not known yet."""
    rows = session.execute(
        select(Job.id, Job.metrics)
        .where(
            Job.model_id == model_id,
            Job.status == JobStatus.SUCCEEDED,
            Job.served_by_job_id.is_(None),
        )
        .order_by(Job.finished_at.desc())
        .limit(WINDOW)
    ).all()
    approximate: list[tuple[float, bool, int | None]] = []
    retrain: tuple[str, float] | None = None
    for job_id, metrics in rows:
        n = (metrics or {}).get("n_forget")
        for attempt in (metrics or {}).get("attempts") or []:
            seconds = attempt.get("seconds")
            if not isinstance(seconds, int | float):
                continue
            if attempt.get("method") == RETRAIN:
                retrain = retrain or (job_id, float(seconds))
            elif attempt.get("outcome") in ("released", "held"):
                held = attempt["outcome"] == "held"
                approximate.append((float(seconds), held, n if isinstance(n, int) else None))
    if retrain is None or not approximate:
        return None
    a = statistics.median(s for s, _, _ in approximate)
    p = held_share(approximate, records)
    r = retrain[1]
    return {
        "approximate_s": round(a, 3),
        "held_share": round(p, 3),
        "retrain_s": round(r, 3),
        "runs": len(rows),
        "records": records,
        "retrain_measured_by": retrain[0],
        "exact_first": r * (1 - p) <= a,
    }


def costs_for(
    settings: Settings, factory: sessionmaker[Session], model_id: str, records: int
) -> dict[str, Any] | None:
    """``route_costs`` in a short read of its own; None when the setting is off."""
    if not settings.exact_when_cheaper:
        return None
    with factory() as session:
        return route_costs(session, model_id, records)


def record_bound(
    settings: Settings,
    factory: sessionmaker[Session],
    model_id: str,
    method: str,
    retrainable: bool,
) -> int:
    """How many records a run of ``method`` may take in (worker.coalescing). A run that will
    retrain at once gets ``coalesce_max_records_exact``: its cost does not grow with the
    records it drops. The costs are asked for the smallest run only that bound allows;
    ``held_share`` grows with the records, so every larger run retrains at once too."""
    bound, exact = settings.coalesce_max_records, settings.coalesce_max_records_exact
    if bound == 0 or exact <= bound:
        return bound
    if method == RETRAIN:
        return exact
    if not retrainable or settings.escalation != RETRAIN:
        return bound
    costs = costs_for(settings, factory, model_id, bound + 1)
    return exact if costs is not None and costs["exact_first"] else bound


__all__ = ["WINDOW", "costs_for", "held_share", "record_bound", "route_costs"]
