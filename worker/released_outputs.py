"""Set logits of the model versions this process released, for the next job's "before".

Job k's "after" evaluation scored version k on the eval set, the member probe and the
member sample; job k+1 starts from version k and would score the same sets again. This
process keeps the logits of the last few versions it saved (keyed by version id: a saved
checkpoint computes exactly the function that was evaluated), so the next job's "before"
only passes the sets it has not seen (its own forget records) through the model. Each
process has its own (a Celery child, the embedded executor); a miss costs one forward.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import nn

from worker.imu.set_outputs import SetKey, SetOutputs

KEEP_VERSIONS = 4

_lock = threading.Lock()
_kept: OrderedDict[str, dict[SetKey, torch.Tensor]] = OrderedDict()


def outputs_for(version_id: str | None, model: nn.Module) -> SetOutputs:
    """A cache for ``model``, the checkpoint of ``version_id``, seeded with what this
    process computed for that version."""
    with _lock:
        carry = _kept.get(version_id) if version_id else None
    return SetOutputs(model, carry=carry)


def keep(version_id: str, outputs: SetOutputs) -> None:
    with _lock:
        _kept[version_id] = outputs.entries()
        _kept.move_to_end(version_id)
        while len(_kept) > KEEP_VERSIONS:
            _kept.popitem(last=False)


def forget_all() -> None:
    with _lock:
        _kept.clear()


__all__ = ["KEEP_VERSIONS", "forget_all", "keep", "outputs_for"]
