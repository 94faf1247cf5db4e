"""The ascent controller shared by IMU and gradient ascent (ALGORITHM.md §5).

An ``AscentProblem`` is what to climb: θ, the number of samples cycled through, and the
loss to minimise on a mini-batch of them. Two schedules run it:

- ``fixed_schedule``: ``epochs`` passes at a given lr (the authors' loop, ``calibration="off"``);
- ``calibrated_ascent``: lr scaled to the model (η‖θ‖/‖∇L(θ₀)‖), steps until a forgetting
  target is met (``Checks``), a utility guard on held-out records with snapshot and
  backtracking, and a step budget.

Every sample of an epoch is used exactly once (``epoch_batches``); the order is drawn from
a generator seeded by the config, so a run is deterministic for a seed on one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.imu._util import Progress, epoch_batches
from worker.imu.checks import Checks, Measurement
from worker.imu.config import StepConfig

# Calibration stop reasons, as stored in stats["calibration"]["reason"].
TARGET_AT_START = "target-at-start"
TARGET_REACHED = "target-reached"
GUARD_EXHAUSTED = "guard-exhausted"
BUDGET_EXHAUSTED = "budget-exhausted"
NO_HELDOUT = "no-heldout-data"
ZERO_GRADIENT = "zero-gradient"
OVER_FORGOTTEN_AT_START = "over-forgotten-at-start"
OVERSHOOT_EXHAUSTED = "overshoot-exhausted"


@dataclass
class AscentProblem:
    """θ and the loss to minimise on a batch of sample indices (0..n-1), without the L1."""

    model: nn.Module
    params: list[nn.Parameter]
    n: int
    batch_loss: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int
    train_mode: bool  # the model's mode during steps (BatchNorm then needs two samples)
    l1: bool = False  # IMU adds α‖θ‖₁; gradient ascent does not

    def batches(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Endless shuffled epochs of mini-batches."""
        while True:
            order = torch.randperm(self.n, generator=generator)
            yield from epoch_batches(order, self.batch_size, avoid_single=self.train_mode)

    def loss(self, idx: torch.Tensor, alpha: float) -> torch.Tensor:
        loss = self.batch_loss(idx)
        if self.l1 and alpha:
            loss = loss + alpha * sum(p.abs().sum() for p in self.params)
        return loss


@dataclass
class Snapshot:
    """θ and every buffer (BatchNorm running statistics move in train mode)."""

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]

    @classmethod
    def take(cls, problem: AscentProblem) -> Snapshot:
        return cls(
            [p.detach().clone() for p in problem.params],
            [b.detach().clone() for b in problem.model.buffers()],
        )

    def restore(self, problem: AscentProblem) -> None:
        with torch.no_grad():
            for p, saved in zip(problem.params, self.params, strict=True):
                p.copy_(saved)
            for b, saved in zip(problem.model.buffers(), self.buffers, strict=True):
                b.copy_(saved)


@dataclass
class CalibrationOutcome:
    reason: str
    steps: int
    lr: float
    alpha: float
    backtracks: int
    guard_max_drop: float
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    start: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)

    def as_stats(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "steps": self.steps,
            "lr": self.lr,
            "alpha": self.alpha,
            "backtracks": self.backtracks,
            "guard_max_drop": self.guard_max_drop,
            "start": self.start,
            "final": self.final,
            "trajectory": self.trajectory,
        }


def _optimizer(problem: AscentProblem, cfg: StepConfig, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(
        problem.params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def _step(
    opt: torch.optim.Optimizer,
    problem: AscentProblem,
    idx: torch.Tensor,
    alpha: float,
    max_grad_norm: float | None = None,
) -> float:
    loss = problem.loss(idx, alpha)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        # Bounded steps: the lr was sized on θ₀'s gradient, which vanishes on memorised
        # records (lr 0.9-2.7 measured); once ascent wakes the gradient up, an unclipped
        # step would be orders of magnitude longer than η‖θ‖.
        torch.nn.utils.clip_grad_norm_(problem.params, max_grad_norm)
    opt.step()
    return float(loss.detach())


def fixed_schedule(
    problem: AscentProblem,
    cfg: StepConfig,
    *,
    lr: float,
    alpha: float,
    epochs: int,
    generator: torch.Generator,
    progress: Progress | None,
) -> list[float]:
    """``epochs`` passes over the samples at a fixed lr; the mean loss per epoch."""
    opt = _optimizer(problem, cfg, lr)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(problem.n, generator=generator)
        total = 0.0
        for idx in epoch_batches(order, problem.batch_size, avoid_single=problem.train_mode):
            total += _step(opt, problem, idx, alpha) * idx.numel()
        losses.append(total / problem.n)
        if progress is not None:
            progress("unlearning", (epoch + 1) / epochs)
    opt.zero_grad(set_to_none=True)
    return losses


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def initial_gradient_norm(problem: AscentProblem, generator: torch.Generator) -> float:
    """‖∇θ L(θ₀)‖ over one epoch's batches (their mean gradient); buffers restored after,
    so a train-mode forward leaves no trace."""
    saved = Snapshot.take(problem)
    grads = [torch.zeros_like(p) for p in problem.params]
    order = torch.randperm(problem.n, generator=generator)
    parts = epoch_batches(order, problem.batch_size, avoid_single=problem.train_mode)
    for idx in parts:
        got = torch.autograd.grad(problem.batch_loss(idx), problem.params, allow_unused=True)
        for acc, g in zip(grads, got, strict=True):
            if g is not None:
                acc.add_(g, alpha=1.0 / len(parts))
    saved.restore(problem)
    return _norm(grads)


def calibrated_ascent(
    problem: AscentProblem,
    checks: Checks,
    cfg: StepConfig,
    *,
    l1_scale: float,
    generator: torch.Generator,
    progress: Progress | None,
    check_every: int,
    max_drop: float,
) -> CalibrationOutcome:
    """Ascend until ``checks`` says the target is met, guarding utility (ALGORITHM.md §5).

    On return θ and the buffers hold the last state that passed the guard."""
    theta_norm = _norm(list(problem.params))
    numel = sum(p.numel() for p in problem.params)
    start = checks.measure()
    outcome = CalibrationOutcome("", 0, 0.0, 0.0, 0, max_drop, start=start.as_dict())
    outcome.trajectory.append({"step": 0, **start.as_dict()})
    if not checks.has_target:
        outcome.reason, outcome.final = NO_HELDOUT, start.as_dict()
        return outcome
    if checks.target_met(start):
        outcome.reason, outcome.final = TARGET_AT_START, start.as_dict()
        return outcome
    if checks.overshot(start):  # ascent only pushes the records further out
        outcome.reason, outcome.final = OVER_FORGOTTEN_AT_START, start.as_dict()
        return outcome
    grad_norm = initial_gradient_norm(problem, generator)
    if not math.isfinite(grad_norm) or grad_norm == 0.0 or theta_norm == 0.0:
        outcome.reason, outcome.final = ZERO_GRADIENT, start.as_dict()
        return outcome
    lr = cfg.step_scale * theta_norm / grad_norm
    # Scale-free L1: each step shrinks θ by about l1_scale of its RMS (lr·α = κ‖θ‖/√P).
    alpha = l1_scale * theta_norm / (math.sqrt(numel) * lr) if problem.l1 else 0.0
    outcome.lr, outcome.alpha = lr, alpha

    good = Snapshot.take(problem)
    opt = _optimizer(problem, cfg, lr)
    batches = problem.batches(generator)
    reason = BUDGET_EXHAUSTED
    last: Measurement = start
    for step in range(1, cfg.max_steps + 1):
        _step(opt, problem, next(batches), alpha, max_grad_norm=grad_norm)
        outcome.steps = step
        if progress is not None:
            progress("unlearning", step / cfg.max_steps)
        if step % check_every and step != cfg.max_steps:
            continue
        now = checks.measure()
        outcome.trajectory.append({"step": step, "lr": lr, **now.as_dict()})
        damaged = checks.guard_failed(start, now, max_drop)
        if damaged or checks.overshot(now):
            # Back to the last state that neither damaged utility nor overshot, shorter steps.
            good.restore(problem)
            if outcome.backtracks == cfg.max_backtracks:
                reason = GUARD_EXHAUSTED if damaged else OVERSHOOT_EXHAUSTED
                break
            outcome.backtracks += 1
            lr /= 2  # and momentum starts afresh: the old velocity pointed into the damage
            opt = _optimizer(problem, cfg, lr)
            continue
        good, last = Snapshot.take(problem), now
        if checks.target_met(now):
            reason = TARGET_REACHED
            break
    opt.zero_grad(set_to_none=True)
    outcome.reason, outcome.final = reason, last.as_dict()
    return outcome
