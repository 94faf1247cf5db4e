"""One claimed attempt of a job: loading → influence → unlearning → evaluating → saving.

Progress and cancellation. The engine reports progress through `progress(phase, fraction)`;
each report also checks for a lost lease, a cancel request and a shutdown. A monitor thread
(worker.lease.JobMonitor) renews the lease, persists progress and polls `cancel_requested`.

Fencing. Every write after the claim is fenced on (status=running, worker_id, attempts)
(worker.job_queue.Fence): a worker that lost its lease cannot save.

Errors. `JobError` is deterministic (missing or already-forgotten records, corrupt or missing
checkpoint, unreadable dataset, invalid parameters, unknown architecture, time limit): the job
fails at once, retrying cannot help. Known transient faults (`worker.errors.is_transient`:
database or storage unreachable, CUDA out of memory, a source version changed under us) send
the job back to `queued` with the error recorded, retried until `max_attempts` claims have
been made, after which it fails for good with the last error. Anything else is a bug: the job
fails at once with the traceback in its error (`internal-error`). If even recording the error
is impossible (database down), the job keeps its lease until it expires and the reaper
re-queues it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.domain.states import PHASES, JobStatus, Phase, VersionStatus
from service.storage.db import transaction
from service.storage.tables import Job
from service.trust.policy import effective_policy
from service.trust.purge import key_sha256
from worker.coalescing import Member, MembersChanged, absorb, wait_for_companions
from worker.context import Outcome, RunnerContext, RunResult
from worker.errors import (
    Cancelled,
    Interrupted,
    JobError,
    LeaseLost,
    bug_problem,
    is_time_limit,
    is_transient,
    time_limit_problem,
    transient_problem,
)
from worker.forgetting import Answer, answer
from worker.job_queue import (
    Claim,
    Fence,
    checkpoint_key,
    cleanup_job_checkpoints,
    finish_job,
    lock_claimed,
    requeue,
    retry_delay,
    retry_or_finish,
)
from worker.lease import JobMonitor
from worker.loading import JobInputs, Loaded, Loader
from worker.metrics_server import observe_phases
from worker.routing import costs_for, record_bound
from worker.saving import commit_version, finish_activation, write_checkpoint

if TYPE_CHECKING:
    from worker.imu.set_outputs import SetOutputs

log = logging.getLogger("lethe.worker")


class Execution:
    def __init__(self, ctx: RunnerContext, claim: Claim) -> None:
        self.ctx = ctx
        self.job_id = claim.job_id
        self.model_id = claim.model_id
        self.attempt = claim.attempt
        self.fence = Fence(claim.job_id, claim.model_id, ctx.worker_id, claim.attempt)
        self.monitor = JobMonitor(
            ctx.session_factory,
            job_id=self.job_id,
            worker_id=ctx.worker_id,
            attempt=claim.attempt,
            lease_seconds=ctx.settings.lease_seconds,
            heartbeat_seconds=ctx.settings.heartbeat_seconds,
        )
        self.timings: dict[str, float] = {}
        self.membership: Any = None  # the request's MembershipTest, built after loading
        self.outputs: SetOutputs | None = None  # set logits of the last evaluated model state
        self._phase: str | None = None
        self._phase_started = 0.0
        self.written_key: str | None = None

    # Phases and progress ------------------------------------------------------------
    def _enter(self, phase: str) -> None:
        if phase == self._phase:
            return
        self._close_phase()
        self._phase, self._phase_started = phase, time.perf_counter()
        self.monitor.report(phase, 0.0)

    def _close_phase(self) -> None:
        if self._phase is not None:
            now = time.perf_counter()
            spent = now - self._phase_started
            self.timings[self._phase] = self.timings.get(self._phase, 0.0) + spent
            self._phase_started = now

    def check(self) -> None:
        if self.monitor.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease taken over")
        if self.monitor.cancel_requested.is_set():
            raise Cancelled(f"job {self.job_id}: cancel requested")
        if self.ctx.interrupt.is_set():
            raise Interrupted(f"job {self.job_id}: worker shutting down")

    def progress(self, phase: str, fraction: float) -> None:
        known = phase in PHASES or phase == Phase.RETRAINING
        phase = phase if known else (self._phase or Phase.UNLEARNING)
        self._enter(phase)
        fraction = min(1.0, max(0.0, float(fraction))) if math.isfinite(fraction) else 0.0
        self.monitor.report(phase, fraction)
        self.check()

    # Main ------------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.perf_counter()
        self.monitor.start()
        try:
            self._enter(Phase.LOADING)
            loaded = Loader(self.ctx, self.job_id, self.progress, self._coalesce).load()
            self.check()
            rules = effective_policy(self.ctx.settings, loaded.params.get("policy"))
            self._enter(Phase.EVALUATING)  # the "before" side is evaluation, not loading
            self.membership = self._membership_test(loaded, rules)
            before = self._evaluate(loaded)
            self.check()
            result = answer(
                loaded,
                before,
                rules,
                escalation=self.ctx.settings.escalation,
                evaluate=self._evaluate_after,
                approximate=self._unlearn,
                exact=self._retrain,
                costs=costs_for(
                    self.ctx.settings, self.ctx.session_factory, self.model_id, len(loaded.keys)
                ),
            )
            self.progress(Phase.EVALUATING, 1.0)
            self._enter(Phase.SAVING)
            self.check()
            self.timings["total"] = time.perf_counter() - started
            version_id = self._save(loaded, result, started)
            return RunResult(Outcome.SUCCEEDED, self.job_id, version_id=version_id)
        except Cancelled:
            return self._finish_cancelled()
        except Interrupted:
            return self._hand_back()
        except MembersChanged as exc:  # start again without the job that left
            log.info("job %s: %s; restarting the run", self.job_id, exc)
            self._hand_back(reason="coalesced job left the run")
            return RunResult(Outcome.RETRY, self.job_id, detail=str(exc), retry_in=0.0)
        except LeaseLost as exc:
            log.warning("%s", exc)
            self._delete_written()
            return RunResult(Outcome.LOST, self.job_id, detail=str(exc))
        except JobError as exc:
            return self._fail(exc.problem())
        except Exception as exc:
            if is_time_limit(exc):
                return self._fail(time_limit_problem(self.ctx.settings.job_soft_time_limit_s))
            log.exception("job %s attempt %s failed", self.job_id, self.attempt)
            if not is_transient(exc):  # a bug: retrying runs it again; say where it is
                self._delete_written()
                return self._fail(bug_problem(exc))
            return self._retry_or_fail(exc)
        finally:
            self.monitor.stop()
            observe_phases(self.timings)  # the worker's lethe_job_phase_duration_seconds

    # Engine ----------------------------------------------------------------------------
    def _evaluate(self, loaded: Loaded) -> dict[str, Any]:
        from worker.imu.set_outputs import SetOutputs
        from worker.job_metrics import job_metrics
        from worker.released_outputs import outputs_for

        if loaded.lm:
            from worker.lm_job import lm_metrics

            return lm_metrics(loaded)
        # The first evaluation scores the source version: what this process computed when
        # it released that version is reused. Later ones score a changed model: new cache.
        first = self.outputs is None
        self.outputs = (
            outputs_for(loaded.source_version_id, loaded.model)
            if first
            else SetOutputs(loaded.model)
        )
        carried = len(self.outputs)
        metrics = job_metrics(
            loaded.model,
            forget=loaded.forget,
            eval_pair=loaded.eval,
            member_probe=loaded.member_probe,
            class_wise=loaded.class_wise,
            membership=self.membership,
            parts=self._parts(loaded),
            outputs=self.outputs,
            eval_rows=loaded.eval_rows,
        )
        # What the evaluation cost: passes through the model, and sets carried from the
        # release of the source version (ALGORITHM.md §6).
        metrics["forward_passes"], metrics["sets_carried"] = self.outputs.forwards, carried
        return metrics

    def _parts(self, loaded: Loaded) -> list[list[int]] | None:
        """Each served request's records as indices into the run's forget set (its own
        first), or None for a run that serves one request."""
        if not loaded.served:
            return None
        sizes = [len(loaded.keys) - sum(len(m.keys) for m in loaded.served)]
        sizes += [len(m.keys) for m in loaded.served]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [list(range(a, a + n)) for a, n in zip(starts, sizes, strict=True)]

    def _coalesce(self, inputs: JobInputs, whole_class: Callable[[Any], bool]) -> list[Member]:
        """Take in the queued requests that can share this run (worker.coalescing)."""
        settings = self.ctx.settings
        factory, retrainable = self.ctx.session_factory, inputs.recipe is not None
        bound = record_bound(settings, factory, self.model_id, inputs.method, retrainable)
        if len(inputs.keys) >= bound or whole_class(inputs.keys):
            return []
        if settings.coalesce_window_s > 0 and inputs.created_at is not None:
            wait_for_companions(inputs.created_at, settings.coalesce_window_s, self.check)
        with transaction(self.ctx.session_factory) as session:
            members = absorb(
                session,
                self.fence,
                dataset_id=inputs.dataset.dataset_id,
                keys=inputs.keys,
                max_records=bound,
                whole_class=whole_class,
                actor=self.ctx.actor,
            )
        if members:
            records = sum(len(m.keys) for m in members)
            log.info(
                "job %s: serves %d more requests (%d records)", self.job_id, len(members), records
            )
        return members

    def _evaluate_after(self, loaded: Loaded) -> dict[str, Any]:
        self._enter(Phase.EVALUATING)
        self.check()
        return self._evaluate(loaded)

    def _retrain(self, loaded: Loaded) -> dict[str, Any]:
        """Exact forgetting: the recipe on the retained records; progress per epoch (each
        report is also where a cancel or a lost lease stops the run)."""
        from worker.imu.recipe import Recipe, retrain

        if loaded.recipe is None or loaded.retained is None:
            raise JobError(
                "no-recipe",
                "No training recipe",
                loaded.exact_route or "the model has no training recipe to retrain with",
            )
        self._enter(Phase.RETRAINING)
        if loaded.lm:
            from worker.lm_retrain import run_lm_retrain

            return run_lm_retrain(loaded, self.progress, self.ctx.device)
        recipe = Recipe.from_dict(loaded.recipe)
        x, y = loaded.retained()
        self.progress(Phase.RETRAINING, 0.0)
        t0 = time.perf_counter()
        model, stats = retrain(
            loaded.architecture,
            loaded.arch_kwargs or {},
            x,
            y,
            recipe,
            device=self.ctx.device,
            on_epoch=lambda done, _loss: self.progress(Phase.RETRAINING, done / recipe.epochs),
        )
        stats["seconds"] = {"retrain": time.perf_counter() - t0}
        loaded.model = model
        return stats

    def _membership_test(self, loaded: Loaded, rules: dict[str, Any]) -> Any:
        """The request's membership test (ALGORITHM.md §6), at the policy's thresholds, or
        None when the model has no eval set or no retained records (the policy then holds)."""
        if loaded.lm or loaded.nonmembers is None or loaded.members is None:
            return None
        from worker.imu.membership import MembershipTest

        try:
            return MembershipTest(
                loaded.forget,
                loaded.members,
                loaded.nonmembers,
                class_wise=loaded.class_wise,
                alpha=rules["max_false_release_rate"],
                max_advantage=rules["max_membership_advantage"],
                band=rules["membership_band"],
            )
        except ValueError as exc:  # too few non-members: no evidence, and the policy says so
            log.warning("job %s: no membership test: %s", self.job_id, exc)
            return None

    def _unlearn(self, loaded: Loaded) -> dict[str, Any]:
        from worker.unlearning import InvalidParams, run_engine

        try:
            if loaded.lm:
                from worker.lm_job import run_lm_engine

                return run_lm_engine(loaded, self.progress, lambda i: key_sha256(loaded.keys[i]))
            return run_engine(
                loaded.method,
                loaded.params,
                loaded.model,
                loaded.forget,
                guard=loaded.guard,
                class_wise=loaded.class_wise,
                device=self.ctx.device,
                progress=self.progress,
                key_hash=lambda i: key_sha256(loaded.keys[i]),
                membership=self.membership,
            )
        except InvalidParams as exc:
            if self.monitor.cancel_requested.is_set():
                raise Cancelled() from None
            raise JobError("invalid-params", "Invalid parameters", str(exc)) from None

    # Saving ----------------------------------------------------------------------------
    def _save(self, loaded: Loaded, result: Answer, started: float) -> str:
        key = checkpoint_key(self.model_id, self.job_id, self.attempt)
        self.written_key = key  # set first: a half-written file is deleted too
        state = loaded.model
        if loaded.lm:
            from worker.lm_job import lm_state_dict

            state = lm_state_dict(loaded.model, loaded.layout)
        stored = write_checkpoint(self.ctx.storage, key, self.job_id, state)
        self.progress(Phase.SAVING, 0.5)
        self.ctx.hook("before_save", self.job_id)
        self._close_phase()
        self.timings["total"] = time.perf_counter() - started
        before, after, stats, policy = result.before, result.after, result.stats, result.policy
        metrics = {
            "before": before,
            "after": after,
            "influence": stats,
            "device": self.ctx.device,
            "method": loaded.method,
            "n_forget": len(loaded.keys),
            "eval_split": loaded.eval_split,
            "policy": policy,
            "forgetting": result.forgetting,
            "attempts": result.attempts,
        }
        if loaded.served:
            metrics["coalesced"] = {
                "requests": 1 + len(loaded.served),
                "records": len(loaded.keys),
                "job_ids": [self.job_id, *(m.job_id for m in loaded.served)],
            }
        commit_started = time.perf_counter()
        try:
            version_id = commit_version(self.ctx, self.fence, loaded, stored, metrics, self.timings)
        except BaseException:
            self._delete_written()
            raise
        self._book_commit(time.perf_counter() - commit_started, started)
        cleanup_job_checkpoints(self.ctx.storage, self.model_id, self.job_id, keep=stored.key)
        if policy["decision"] == VersionStatus.ACTIVE:
            finish_activation(self.ctx, self.model_id, loaded.dataset_id, loaded.keys)
            if self.outputs is not None:  # the next job's "before" is this one's "after"
                from worker.released_outputs import keep

                keep(version_id, self.outputs)
        return version_id

    def _book_commit(self, seconds: float, started: float) -> None:
        """The version's transaction belongs to `saving` too (the job row was written in it,
        before its own length was known); best effort, the job has succeeded."""
        self.timings["saving"] = self.timings.get("saving", 0.0) + seconds
        self.timings["total"] = time.perf_counter() - started
        timings = {k: round(v, 6) for k, v in self.timings.items()}
        try:
            with transaction(self.ctx.session_factory) as session:
                session.execute(update(Job).where(Job.id == self.job_id).values(timings=timings))
        except Exception as exc:
            log.warning("job %s: could not book the commit's time: %s", self.job_id, exc)

    # Endings ---------------------------------------------------------------------------
    def _delete_written(self) -> None:
        if self.written_key is not None:
            try:
                self.ctx.storage.delete(self.written_key)
            except Exception as exc:
                log.warning("job %s: could not delete %s: %s", self.job_id, self.written_key, exc)
            self.written_key = None

    def _fenced_update(self, apply: Callable[[Session, Job], None]) -> bool:
        """Run `apply` on our still-claimed job in one transaction; False if we lost it."""
        with transaction(self.ctx.session_factory) as session:
            job = lock_claimed(session, self.fence)
            if job is None:
                return False
            apply(session, job)
            return True

    def _finish_cancelled(self) -> RunResult:
        return self._record_end(
            JobStatus.CANCELLED, Outcome.CANCELLED, payload={"phase": self._phase}, detail=""
        )

    def _fail(self, problem: dict[str, Any]) -> RunResult:
        return self._record_end(
            JobStatus.FAILED, Outcome.FAILED, error=problem, detail=problem.get("detail", "")
        )

    def _record_end(
        self, status: JobStatus, outcome: Outcome, *, detail: str, **finish: Any
    ) -> RunResult:
        """Write a terminal status (no version) while we still hold the job, then clean up."""
        self._delete_written()

        def apply(session: Session, job: Job) -> None:
            self._close_phase()
            job.timings = {k: round(v, 6) for k, v in self.timings.items()}
            finish_job(session, job, status, actor=self.ctx.actor, **finish)

        noun = "cancellation" if status == JobStatus.CANCELLED else "failure"
        try:
            ok = self._fenced_update(apply)
        except Exception as exc:
            log.warning("job %s: could not record %s: %s", self.job_id, noun, exc)
            return RunResult(Outcome.RETRY, self.job_id, detail=f"{noun} not recorded: {exc}")
        if not ok:
            return RunResult(Outcome.LOST, self.job_id, detail=f"lost before {noun} was recorded")
        cleanup_job_checkpoints(self.ctx.storage, self.model_id, self.job_id)
        return RunResult(outcome, self.job_id, detail=detail)

    def _retry_or_fail(self, exc: BaseException) -> RunResult:
        self._delete_written()
        problem = transient_problem(exc)
        final: list[Outcome] = []

        def apply(session: Session, job: Job) -> None:
            status = retry_or_finish(
                session,
                job,
                actor=self.ctx.actor,
                max_attempts=self.ctx.settings.max_attempts,
                error=problem,
                reason="error",
            )
            if status is not None:
                final.append(Outcome(status))

        try:
            ok = self._fenced_update(apply)
        except Exception as record_exc:
            # Most likely the database itself is down: keep the claim; the lease runs out
            # and the reaper re-queues the job once the database is back.
            log.warning(
                "job %s: could not record the error (%s); the reaper will retry it",
                self.job_id,
                record_exc,
            )
            return RunResult(Outcome.RETRY, self.job_id, detail=str(exc))
        if not ok:
            return RunResult(Outcome.LOST, self.job_id, detail="lost before error was recorded")
        if final:
            cleanup_job_checkpoints(self.ctx.storage, self.model_id, self.job_id)
            return RunResult(final[0], self.job_id, detail=str(exc))
        return RunResult(
            Outcome.RETRY, self.job_id, detail=str(exc), retry_in=retry_delay(self.attempt)
        )

    def _hand_back(self, reason: str = "worker shutdown") -> RunResult:
        self._delete_written()

        def apply(session: Session, job: Job) -> None:
            job.attempts = max(0, job.attempts - 1)  # not the job's fault
            requeue(session, job, actor=self.ctx.actor, error=None, reason=reason)

        try:
            self._fenced_update(apply)
        except Exception as exc:
            log.warning("job %s: could not hand the job back: %s", self.job_id, exc)
        return RunResult(Outcome.INTERRUPTED, self.job_id)
