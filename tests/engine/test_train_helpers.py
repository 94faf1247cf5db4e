"""fit / accuracy / per-class accuracy, and the engine's import boundary."""

from __future__ import annotations

import subprocess
import sys

import torch

from worker.imu.architectures import build
from worker.imu.train import accuracy, fit, predict_per_class_accuracy


def test_fit_is_deterministic_and_learns(digits) -> None:
    x, y = digits.flat(digits.x_train), digits.y_train
    states, losses = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = build("mlp", in_features=64, hidden=[32], num_classes=10).double()
        rng_before = torch.random.get_rng_state()
        losses.append(fit(model, x, y, epochs=5, lr=1e-2, seed=4, device="cpu"))
        assert torch.equal(rng_before, torch.random.get_rng_state())  # global RNG untouched
        states.append(model.state_dict())
    assert losses[0] == losses[1] and len(losses[0]) == 5
    assert losses[0][-1] < losses[0][0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not model.training
    assert accuracy(model, digits.flat(digits.x_test), digits.y_test) > 0.9


def test_per_class_accuracy_matches_accuracy(trained_cnn, digits) -> None:
    per_class = predict_per_class_accuracy(trained_cnn, digits.x_test, digits.y_test, 12)
    assert per_class[10] is None and per_class[11] is None
    counts = torch.bincount(digits.y_test, minlength=10).double()
    weighted = sum(a * float(c) for a, c in zip(per_class[:10], counts, strict=True))
    assert (
        abs(weighted / float(counts.sum()) - accuracy(trained_cnn, digits.x_test, digits.y_test))
        < 1e-12
    )
    assert all(0.0 <= a <= 1.0 for a in per_class[:10])


def test_engine_imports_no_service_or_queue_code() -> None:
    code = (
        "import sys, worker.imu, worker.imu.architectures, worker.imu.checkpoints, "
        "worker.imu.train; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('celery', 'fastapi', 'sqlalchemy', 'service', 'redis', 'kombu', 'uvicorn')]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
