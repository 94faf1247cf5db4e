"""Evidence per part of one forget set: when one run forgets the records of several requests,
each request is judged on its own records.

The model is scored once (the same reference, members and null as the whole set's test); each
part's records are then judged alone, so a request's false-release rate is stated for its own
n and a part that is still remembered cannot hide inside a larger union that looks forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from worker.imu.membership import Evidence, MembershipTest, judge_parts


def assess_with_parts(
    test: MembershipTest, logits_of: Any, parts: Sequence[Sequence[int]]
) -> tuple[Evidence, list[Evidence | None]]:
    """The whole set's Evidence (as ``test.assess``) and one per part (indices into the
    test's forget records in the caller's order; None for a part none of whose records the
    test scored, a seeded subset above MAX_FORGET), from one scoring of the model: scoring
    is most of an evaluation's cost, and a coalesced run judges both."""
    folds = test.scores(logits_of)
    position = {int(i): p for p, i in enumerate(test.picked.tolist())}
    rows = [
        torch.tensor([position[i] for i in part if i in position], dtype=torch.long)
        for part in parts
    ]
    scored = [torch.arange(len(position)), *(r for r in rows if r.numel() > 0)]
    judged = iter(
        judge_parts(
            folds,
            scored,
            class_wise=test.class_wise,
            alpha=test.alpha,
            band=test.band,
            max_advantage=test.max_advantage,
        )
    )
    n_nonmembers = int(len(test.nonmembers[1]))  # the null repeats atypical labels
    whole = next(judged)
    whole.n_nonmembers = n_nonmembers
    out: list[Evidence | None] = []
    for r in rows:
        evidence = next(judged) if r.numel() > 0 else None
        if evidence is not None:
            evidence.n_nonmembers = n_nonmembers
        out.append(evidence)
    return whole, out


__all__ = ["assess_with_parts"]
