"""`lethe demo`: the whole product in a few minutes, every step through the public HTTP API.

Trains (once, then cached) a small CNN on scikit-learn's bundled digits, starts the embedded
service in the background, registers data and model, asks it to forget one whole class and
then a random 5 % of another, follows both jobs live, and checks what came back (sha256 of
the downloaded checkpoint, that it loads into the architecture, the audit chain). Training
is the engine's business (`worker.imu.train`); this module only orchestrates.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from service import engine
from service.cli.api_client import LetheAPIError, LetheClient
from service.devtools.localserver import LocalService
from service.domain.states import PHASES, Phase, RequestStatus

ARCHITECTURE = "cnn"
NUM_CLASSES = 10
# The authors' lr 0.01 was tuned for ResNet-18 heads fed BatchNorm-ed features; this small
# CNN's penultimate features are ~45 in norm, so at 0.01 the first steps already collapse the
# head to one class. A per-request override (bounds-checked by the service) fixes the scale.
# A default request: the engine calibrates its own intensity (ALGORITHM.md §5).
IMU_PARAMS: dict[str, Any] = {}


@dataclass(frozen=True)
class DemoConfig:
    home: Path
    fast: bool = False
    seed: int = 0
    forget_class: int = 3  # request 1: every training record of this class
    partial_class: int = 8  # request 2: a random share of this class
    partial_fraction: float = 0.05

    @property
    def demo_dir(self) -> Path:
        return self.home / "demo"

    @property
    def width(self) -> int:
        return 16 if self.fast else 32

    @property
    def train_epochs(self) -> int:
        return 25 if self.fast else 40

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        # BatchNorm, as most deployed CNNs have (and the backbone mode was chosen for).
        return {
            "in_channels": 1,
            "num_classes": NUM_CLASSES,
            "width": self.width,
            "batch_norm": True,
        }


@dataclass
class Split:
    ids: np.ndarray
    inputs: np.ndarray
    labels: np.ndarray

    def subset(self, mask: np.ndarray) -> Split:
        return Split(self.ids[mask], self.inputs[mask], self.labels[mask])

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Fixed-width unicode ids: readable with allow_pickle=False, as the service requires.
        np.savez(path, ids=self.ids.astype(str), inputs=self.inputs, labels=self.labels)
        return path


@dataclass
class JobReport:
    label: str
    request_id: str
    job: dict[str, Any]
    version: dict[str, Any] | None
    forget_keys: list[str]
    promoted: bool = False


@dataclass
class DemoResult:
    url: str
    model_name: str
    jobs: list[JobReport]
    final_version: dict[str, Any]
    checkpoint_path: Path
    checkpoint_sha256: str
    audit: dict[str, Any]
    plot_path: Path | None  # None without matplotlib (the `demo` extra)
    per_class_before: list[float]
    per_class_after: list[float]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# -- data and the trained model ------------------------------------------------------------
def digits_splits(seed: int) -> tuple[Split, Split]:
    """Stratified train/eval split of sklearn digits as 1x8x8 images with string ids."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    inputs = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    ids = np.array([f"digit-{i:04d}" for i in range(len(labels))])
    idx_train, idx_eval = train_test_split(
        np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=seed
    )
    whole = Split(ids, inputs, labels)
    return whole.subset(np.sort(idx_train)), whole.subset(np.sort(idx_eval))


def forget_sets(train: Split, cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """Request 1: every train record of one class; request 2: a random share of another."""
    rng = np.random.default_rng(cfg.seed)
    whole_class = train.ids[train.labels == cfg.forget_class].tolist()
    other = train.ids[train.labels == cfg.partial_class]
    k = max(1, round(cfg.partial_fraction * len(other)))
    partial = sorted(rng.choice(other, size=k, replace=False).tolist())
    return whole_class, partial


def member_probe(train: Split, excluded: set[str], seed: int, size: int) -> Split:
    """Retained training records (never to be forgotten), used only to measure membership.

    As many as the eval set holds, so the membership classifier sees balanced classes.
    """
    rng = np.random.default_rng(seed + 1)
    candidates = np.flatnonzero([i not in excluded for i in train.ids])
    chosen = np.sort(rng.choice(candidates, size=min(size, len(candidates)), replace=False))
    mask = np.zeros(len(train.ids), dtype=bool)
    mask[chosen] = True
    return train.subset(mask)


def trained_checkpoint(train: Split, cfg: DemoConfig, log: Callable[[str], None]) -> Path:
    """The demo CNN's weights, trained once per configuration and cached under demo/."""
    path = cfg.demo_dir / f"digits-cnn-w{cfg.width}-e{cfg.train_epochs}-s{cfg.seed}.safetensors"
    if path.exists():
        log(f"using the cached trained model {path}")
        return path
    import torch

    log(f"training the CNN on {len(train.labels)} records ({cfg.train_epochs} epochs; once)")
    torch.manual_seed(cfg.seed)
    model = engine.build_model(ARCHITECTURE, **cfg.arch_kwargs)
    started = time.monotonic()
    x, y = torch.from_numpy(train.inputs), torch.from_numpy(train.labels)
    engine.fit(model, x, y, epochs=cfg.train_epochs, seed=cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    engine.save_safetensors(model, path)
    log(f"trained the CNN in {time.monotonic() - started:.1f}s, cached at {path}")
    return path


def per_class_accuracy(weights: Path, split: Split, cfg: DemoConfig) -> list[float]:
    """Loads a safetensors checkpoint into the registered architecture and scores it."""
    import torch

    model = engine.build_model(ARCHITECTURE, **cfg.arch_kwargs)
    engine.load_safetensors_into(model, weights)
    acc = engine.per_class_accuracy(
        model, torch.from_numpy(split.inputs), torch.from_numpy(split.labels), NUM_CLASSES
    )
    return [float("nan") if a is None else float(a) for a in acc]


def retained_accuracy(per_class: list[float], split: Split, cfg: DemoConfig) -> float:
    """Eval accuracy over every class but the one forgotten whole (weighted by class size)."""
    counts = np.bincount(split.labels, minlength=NUM_CLASSES).astype(float)
    counts[cfg.forget_class] = 0.0
    acc = np.nan_to_num(np.asarray(per_class, dtype=float))
    return float((acc * counts).sum() / counts.sum())


# -- metrics in job documents --------------------------------------------------------------
METRIC_ROWS = (
    ("forget acc", "forget_acc"),
    ("eval acc", "eval_acc"),
    ("member-probe acc", "member_probe_acc"),
    ("MIA efficacy", "mia_efficacy"),
)


def before_after(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    metrics = job.get("metrics") or {}
    return dict(metrics.get("before") or {}), dict(metrics.get("after") or {})


def phase_seconds(job: dict[str, Any]) -> dict[str, float]:
    timings = job.get("timings") or (job.get("metrics") or {}).get("timings") or {}
    found: dict[str, float] = {}
    for phase in (*PHASES, Phase.RETRAINING):
        for key in (phase, f"{phase}_s", f"{phase}_seconds"):
            value = timings.get(key)
            if isinstance(value, int | float):
                found[phase] = float(value)
                break
    return found


def results_table(reports: list[JobReport]) -> Table:
    caption = ", ".join(f"#{n}: forget {rep.label}" for n, rep in enumerate(reports, 1))
    caption += ". MIA efficacy: share of the forgotten records a membership SVM calls non-members."
    table = Table(title="Before / after each deletion request", caption=caption)
    table.add_column("metric")
    for n in range(1, len(reports) + 1):
        table.add_column(f"#{n} before", justify="right")
        table.add_column(f"#{n} after", justify="right")
    for title, key in METRIC_ROWS:
        row = [title]
        for rep in reports:
            before, after = before_after(rep.job)
            row += [_fmt(before.get(key)), _fmt(after.get(key))]
        table.add_row(*row)
    return table


def timings_table(reports: list[JobReport]) -> Table:
    table = Table(title="Seconds per phase")
    table.add_column("phase")
    for n, rep in enumerate(reports, 1):
        table.add_column(f"#{n} {rep.label}", justify="right")
    for phase in (*PHASES, Phase.RETRAINING):
        table.add_row(phase, *[_fmt(phase_seconds(r.job).get(phase), "{:.2f}") for r in reports])
    return table


def _fmt(value: Any, pattern: str = "{:.3f}") -> str:
    return pattern.format(value) if isinstance(value, int | float) else "-"


# -- the plot -------------------------------------------------------------------------------
def plot_per_class(
    before: list[float], after: list[float], cfg: DemoConfig, path: Path
) -> Path | None:
    """Bar chart of per-class accuracy; None when matplotlib (extra `demo`) is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.arange(len(before))
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    ax.bar(classes - 0.2, before, width=0.4, label="version 1 (before)", color="#8da0cb")
    ax.bar(classes + 0.2, after, width=0.4, label="final version (after)", color="#fc8d62")
    ax.set_xticks(classes)
    ax.set_xlabel("digit class (eval set)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.2)
    ax.set_title(
        f"Lethe demo: forgot every training '{cfg.forget_class}' and "
        f"{cfg.partial_fraction:.0%} of the '{cfg.partial_class}'s"
    )
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- orchestration --------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run the demo end to end; the background service is always stopped at the end."""
    console = console or Console()
    started = time.monotonic()
    cfg.demo_dir.mkdir(parents=True, exist_ok=True)

    def step(text: str) -> None:
        console.print(f"[bold cyan]»[/] {text}")

    step("preparing scikit-learn digits (train / eval / member-probe, string ids)")
    train, eval_split = digits_splits(cfg.seed)
    forget_all, forget_some = forget_sets(train, cfg)
    probe = member_probe(train, set(forget_all) | set(forget_some), cfg.seed, len(eval_split.ids))
    data_dir = cfg.demo_dir / "data"
    files = {
        "train": train.save(data_dir / "train.npz"),
        "eval": eval_split.save(data_dir / "eval.npz"),
        "member_probe": probe.save(data_dir / "member_probe.npz"),
    }
    console.print(
        f"  train {len(train.ids)}, eval {len(eval_split.ids)}, "
        f"member probe {len(probe.ids)} records"
    )

    step("training a small CNN (cached after the first run)")
    weights = trained_checkpoint(train, cfg, lambda msg: console.print(f"  {msg}"))

    service = LocalService(cfg.home, log_path=cfg.demo_dir / "service.log")
    step(f"starting the embedded service (LETHE_HOME={cfg.home}) on {service.url}")
    service.start()
    try:
        key = service.create_key("admin", f"demo-{uuid.uuid4().hex[:8]}")
        console.print(f"  up; admin key created offline; log at {service.log_path}")
        with LetheClient(service.url, key, timeout=120) as api:
            result = _drive(
                api, cfg, files, weights, eval_split, forget_all, forget_some, console, step
            )
    finally:
        step("stopping the service")
        service.stop()
    result.seconds = time.monotonic() - started
    console.print(
        f"[bold green]Demo finished in {result.seconds:.1f}s.[/] "
        f"Plot: {result.plot_path}  Checkpoint: {result.checkpoint_path}"
    )
    return result


def _drive(
    api: LetheClient,
    cfg: DemoConfig,
    files: dict[str, Path],
    weights: Path,
    eval_split: Split,
    forget_all: list[str],
    forget_some: list[str],
    console: Console,
    step: Callable[[str], None],
) -> DemoResult:
    from service.cli.progress import JobProgress

    run_tag = datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    step("uploading the three datasets (POST /v1/datasets)")
    datasets = {}
    for role, path in files.items():
        ds = api.upload_dataset(path, name=f"digits-{role}-{run_tag}", kind="tensor", role=role)
        datasets[role] = ds
        console.print(f"  {role:<13} id={ds['id']} records={ds['record_count']}")

    model_name = f"digits-cnn-{run_tag}"
    step(f"registering model {model_name} (POST /v1/models)")
    spec = {
        "name": model_name,
        "architecture": ARCHITECTURE,
        "arch_kwargs": cfg.arch_kwargs,
        "eval_dataset": datasets["eval"]["id"],
        "member_probe_dataset": datasets["member_probe"]["id"],
        "description": "Lethe demo: small CNN on scikit-learn digits",
        # How train_model made version 1: what IMU cannot show forgotten is retrained (exact).
        "recipe": {
            "epochs": cfg.train_epochs,
            "lr": 1e-3,
            "batch_size": 128,
            "seed": cfg.seed,
            "init_seed": cfg.seed,
            "datasets": [datasets["train"]["id"]],
        },
    }
    model = api.register_model(spec, weights)
    console.print(f"  version 1 id={model['active_version']['id']}")

    requests = [
        (
            f"all {cfg.forget_class}s",
            forget_all,
            f"every training record of digit {cfg.forget_class}",
        ),
        (
            f"{cfg.partial_fraction:.0%} of {cfg.partial_class}s",
            forget_some,
            f"{len(forget_some)} random training records of digit {cfg.partial_class}",
        ),
    ]
    reports: list[JobReport] = []
    for label, keys, what in requests:
        # Each request waits for the previous one so the second starts from the version the
        # first one released (the service would also order them; waiting keeps output tidy).
        step(f"POST /v1/deletion-requests: {what} ({len(keys)} keys)")
        idem = f"demo-{run_tag}-{len(reports)}"
        submit = partial(
            api.submit_deletion,
            model_name,
            datasets["train"]["id"],
            keys,
            params=IMU_PARAMS,
            reason="demo",
            subject_ref=label,
            idempotency_key=idem,
        )
        accepted = submit()
        retried = submit()  # a retried POST: same answer, no second job
        if retried["id"] != accepted["id"]:
            raise RuntimeError("a retried POST with the same Idempotency-Key made a new request")
        console.print(
            f"  202 Accepted: request {accepted['id']}; a retry with the same "
            "Idempotency-Key returned it again (no second job)"
        )
        job_id = accepted["job"]["id"]
        with JobProgress(console, title=f"forget {label}") as bars:  # to the request's end
            request = api.wait_for_request(accepted["id"], 0.25, on_update=bars.update)
        job = request["job"]
        if request["status"] not in (RequestStatus.COMPLETED, RequestStatus.NEEDS_REVIEW):
            err = job.get("error") or {}
            raise RuntimeError(f"request {accepted['id']} {request['status']}: {err.get('detail')}")
        promoted = False
        if request["status"] == RequestStatus.NEEDS_REVIEW:
            # Held by the release policy: say why, then act as the admin reviewer so the
            # walkthrough can go on (the summary records that a person had to decide).
            reasons = (request.get("policy") or {}).get("reasons", [])
            console.print("  [yellow]needs review[/yellow]: " + "; ".join(reasons))
            console.print("  promoting it as the admin reviewer (POST .../promote)")
            api.promote_version(request["result_version"]["id"])
            request = api.get_deletion_request(accepted["id"])
            promoted = True
        version = api.get_version(request["result_version"]["id"])
        tried = "; ".join(f"{a['method']} {a['outcome']}" for a in request.get("attempts") or [])
        ev = request.get("evidence") or {}
        console.print(
            f"  request {request['status']}: job {job_id} -> version {version['number']} "
            f"({version['status']}), forgetting {request.get('forgetting')} ({tried}); "
            f"evidence {ev.get('outcome')} (Z = {ev.get('statistic')}, n = {ev.get('n')})"
        )
        job["request_status"] = request["status"]
        reports.append(JobReport(label, accepted["id"], job, version, keys, promoted))

    console.print(results_table(reports))
    console.print(timings_table(reports))

    registered = api.get_model(model_name)
    final = api.get_version(registered["active_version"]["id"])
    step(f"downloading version {final['number']}'s checkpoint and checking its sha256")
    download = api.download_checkpoint(final["id"], cfg.demo_dir / "final.safetensors")
    console.print(f"  {download.path} sha256 {download.sha256} matches the server's")

    before = per_class_accuracy(weights, eval_split, cfg)
    after = per_class_accuracy(download.path, eval_split, cfg)  # loads into the architecture
    console.print(
        f"  loaded into '{ARCHITECTURE}': eval accuracy on digit {cfg.forget_class} "
        f"{before[cfg.forget_class]:.3f} -> {after[cfg.forget_class]:.3f}; on the other "
        f"digits {retained_accuracy(before, eval_split, cfg):.3f} -> "
        f"{retained_accuracy(after, eval_split, cfg):.3f}"
    )

    step("verifying the audit hash chain (GET /v1/audit/verify)")
    audit = api.verify_audit()
    if not audit.get("ok"):
        raise RuntimeError(f"audit chain broken at seq {audit.get('first_bad_seq')}")
    console.print(f"  intact: {audit.get('checked')} events, head {audit.get('head_hash')}")

    plot = plot_per_class(before, after, cfg, cfg.demo_dir / "per_class_accuracy.png")
    if plot is None:
        step("no plot: matplotlib is not installed (pip install 'lethe-unlearning[demo]')")
    else:
        step(f"per-class accuracy plot written to {plot}")
    summary = {
        "model": model_name,
        "architecture": registered["architecture"],  # as the service recorded them
        "arch_kwargs": registered["arch_kwargs"],
        "forget_class": cfg.forget_class,
        "final_version": final,
        "jobs": [
            {"label": r.label, "request_id": r.request_id, "job": r.job, "promoted": r.promoted}
            for r in reports
        ],
        "per_class_before": before,
        "per_class_after": after,
        "audit": audit,
    }
    (cfg.demo_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return DemoResult(
        url=api.url,
        model_name=model_name,
        jobs=reports,
        final_version=final,
        checkpoint_path=download.path,
        checkpoint_sha256=download.sha256,
        audit=audit,
        plot_path=plot,
        per_class_before=before,
        per_class_after=after,
        seconds=0.0,
    )


__all__ = ["DemoConfig", "DemoResult", "LetheAPIError", "run_demo"]
