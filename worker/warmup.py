"""Pay a worker process's one-time costs at its start, not in its first job.

Measured on `lethe serve` (issue 27): the first jobs after a start paid 1.4-3.8 s for
importing torch and the engine, `torch._dynamo` (imported by the first optimizer step),
scikit-learn (the SVC membership attack) and the dataset reader. Each is done here once on
a toy input; nothing is kept but the loaded modules.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("lethe.worker")


def import_engine() -> float:
    """Only the imports (no torch operation, so no thread pools): safe in a process that
    forks afterwards, whose children then inherit the loaded modules."""
    started = time.perf_counter()
    import sklearn.svm  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (the first optimizer step imports it: 1.5 s here)

    import service.ingest.datasets_io  # noqa: F401
    import worker.imu.evaluation  # noqa: F401
    import worker.imu.membership  # noqa: F401
    import worker.imu.recipe  # noqa: F401
    import worker.imu.unlearn  # noqa: F401
    import worker.job_metrics  # noqa: F401
    import worker.unlearning  # noqa: F401

    return time.perf_counter() - started


def warm_up() -> float:
    """Import and first-call everything a job touches; the seconds it took."""
    started = time.perf_counter()
    import_engine()
    import torch
    from sklearn.svm import SVC

    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.zeros(2, 4)).sum().backward()
    optimizer.step()
    SVC().fit([[0.0], [1.0], [0.1], [0.9]], [0, 1, 0, 1])
    seconds = time.perf_counter() - started
    log.info("warmed up in %.2f s", seconds)
    return seconds
