"""The eval set's two halves: a guard half the calibration controller may look at, and a
policy half only the release policy sees (so the policy judges data the controller did not
optimise against).

The split is by a salted hash of each record key, not by position or a per-job draw: a
record stays in its half across jobs, files and purges, so a later job can never tune on
the records an earlier decision was judged by. The salt is recorded with the metrics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

SPLIT_SALT = "lethe-eval-split-v1"
MIN_PER_HALF = 2  # below this the eval set is too small to split; both roles use all of it


@dataclass(frozen=True)
class EvalSplit:
    guard: list[str]
    policy: list[str]

    def describe(self) -> dict[str, object]:
        return {
            "method": "sha256(salt:key) parity",
            "salt": SPLIT_SALT,
            "n_guard": len(self.guard),
            "n_policy": len(self.policy),
            "shared": self.guard == self.policy,  # too small to split: both use all of it
        }


def in_guard_half(key: str) -> bool:
    return hashlib.sha256(f"{SPLIT_SALT}:{key}".encode()).digest()[0] & 1 == 0


def split_eval_keys(keys: Sequence[str]) -> EvalSplit:
    halves = [in_guard_half(k) for k in keys]  # one hash per key
    guard = [k for k, g in zip(keys, halves, strict=True) if g]
    policy = [k for k, g in zip(keys, halves, strict=True) if not g]
    if min(len(guard), len(policy)) < MIN_PER_HALF:
        return EvalSplit(list(keys), list(keys))
    return EvalSplit(guard, policy)
