"""Reproduce the paper's comparison: retrain vs gradient ascent vs IMU (backbone train / eval).

For one architecture: train a base model (cached), then for each scenario — class-wise
forgetting of one class, random 10 % sample-wise forgetting — and each seed, run every
method on a fresh copy of the base model and measure UA, RA, TA, MIA efficacy and the wall
time of each phase. Writes one JSON file per architecture.

    python -m bench.paper --arch cnn                # CPU default settings
    python -m bench.paper --arch cnn --preset quick # tiny smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from bench.data import BenchData, load_bench_data
from bench.metrics import add_gaps, headline, parse_method
from worker.imu._util import batchnorm_layers

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"
METHODS = ("retrain", "ga", "imu_train", "imu_eval", "imu_cal", "ga_cal")
CALIBRATED = ("imu_cal", "ga_cal")  # the service defaults: guard half of the test set
SCENARIOS = ("classwise", "random")


@dataclass
class TrainSettings:
    epochs: int
    lr: float
    batch_size: int


@dataclass
class GASettings:
    # The authors' settings: SGD over all parameters, momentum 0.9, weight decay 5e-4.
    epochs: int = 10
    lr: float = 1e-2
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class PaperSettings:
    arch: str
    arch_kwargs: dict
    train: TrainSettings
    n_train: int | None = 10_000
    n_test: int | None = 2_000
    data: str = "auto"
    forget_class: int = 0
    random_fraction: float = 0.1
    member_probe_size: int = 2_000
    # RA on a fixed seeded subset of the retain set: the full set costs a forward over 90 %
    # of the training data per evaluation for ±1 % less sampling error. None = all.
    retain_eval_size: int | None = 3_000
    seeds: list[int] = field(default_factory=lambda: [0])
    ga: GASettings = field(default_factory=GASettings)
    device: str = "cpu"
    methods: tuple[str, ...] = METHODS
    # Extra runs at other step sizes, "method@key=value": how sensitive each method is.
    variants: tuple[str, ...] = ()
    scenarios: tuple[str, ...] = SCENARIOS
    label: str = ""  # the result's name when one architecture runs on several data sets


# Architecture kwargs and base training per preset. The CNN runs with BatchNorm so both
# models exercise the difference between the two backbone modes.
_BN_CNN = {"batch_norm": True}
# The BatchNorm CNN on scikit-learn digits: seconds per run, so three seeds fit the CPU bench.
DIGITS = "cnn-digits"
ARCH_DEFAULTS = {
    "default": {
        "cnn": ({"width": 16, **_BN_CNN}, TrainSettings(epochs=8, lr=3e-3, batch_size=128)),
        "resnet18_cifar": ({"width": 8}, TrainSettings(epochs=8, lr=1e-3, batch_size=128)),
        DIGITS: ({"width": 8, **_BN_CNN}, TrainSettings(epochs=30, lr=3e-3, batch_size=64)),
    },
    "full": {
        "cnn": ({"width": 32, **_BN_CNN}, TrainSettings(epochs=20, lr=1e-3, batch_size=128)),
        "resnet18_cifar": ({"width": 64}, TrainSettings(epochs=20, lr=1e-3, batch_size=128)),
        DIGITS: ({"width": 8, **_BN_CNN}, TrainSettings(epochs=30, lr=3e-3, batch_size=64)),
    },
    "quick": {
        "cnn": ({"width": 8, **_BN_CNN}, TrainSettings(epochs=3, lr=3e-3, batch_size=64)),
        "resnet18_cifar": ({"width": 4}, TrainSettings(epochs=3, lr=3e-3, batch_size=64)),
        DIGITS: ({"width": 8, **_BN_CNN}, TrainSettings(epochs=3, lr=3e-3, batch_size=64)),
    },
}
# Sensitivity runs: IMU at smaller step sizes than the engine default, GA at a smaller one;
# and calibrated IMU on cached head inputs (backbone eval), whose cost goal is ≤ 3× a plain
# eval-mode run.
CACHED_HEAD = "imu_cal@backbone_mode=eval"
DEFAULT_VARIANTS = (
    *(f"imu_{mode}@lr={lr}" for lr in ("0.001", "0.0003", "0.0001") for mode in ("train", "eval")),
    "ga@lr=0.01",
    "ga@lr=0.0001",
    CACHED_HEAD,
)


def preset(name: str, arch: str, device: str = "cpu") -> PaperSettings:
    """default: fits `make bench` on 2 CPU cores (10k/2k Fashion-MNIST subset, small widths);
    full: whole dataset, paper-size widths, 3 seeds, for a GPU; quick: seconds, smoke tests."""
    if name not in ARCH_DEFAULTS:
        raise ValueError(f"unknown preset {name!r}")
    kwargs, train = ARCH_DEFAULTS[name][arch]
    settings = PaperSettings(arch, dict(kwargs), train, device=device, variants=DEFAULT_VARIANTS)
    if arch == DIGITS:
        settings = replace(
            settings,
            arch="cnn",
            label=DIGITS,
            data="digits",
            n_train=None,
            n_test=None,
            member_probe_size=300,
            retain_eval_size=None,
            seeds=[0, 1, 2],
            forget_class=3,
        )
        if name == "quick":
            return replace(settings, seeds=[0], variants=("imu_eval@lr=0.001",))
        return settings
    if name == "full":
        return replace(
            settings,
            n_train=None,
            n_test=None,
            member_probe_size=5_000,
            retain_eval_size=None,
            seeds=[0, 1, 2],
        )
    if name == "quick":
        return replace(
            settings,
            n_train=600,
            n_test=200,
            data="digits",
            member_probe_size=200,
            retain_eval_size=None,
            variants=("imu_eval@lr=0.001",),
        )
    return settings


# ---------------------------------------------------------------- helpers


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Timer:
    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> _Timer:
        _sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self.start


def _fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _build(settings: PaperSettings, data: BenchData) -> nn.Module:
    from worker.imu.architectures import build

    return build(
        settings.arch,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        **settings.arch_kwargs,
    )


def train_cached(
    settings: PaperSettings,
    data: BenchData,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    tag: str,
    cache_dir: Path = CACHE_DIR,
) -> tuple[nn.Module, dict]:
    """Train (or load from bench/.cache) a model; returns it and how long training took.

    Weights are cached as safetensors (never pickle); a sidecar JSON keeps the original
    training time so cached reruns still report it (marked `cached`)."""
    from safetensors.torch import load_file, save_file

    from worker.imu.train import fit

    device_type = torch.device(settings.device).type
    key_src = json.dumps(
        {
            "arch": settings.arch,
            "kwargs": settings.arch_kwargs,
            "train": asdict(settings.train),
            "seed": seed,
            "tag": tag,
            "data": _fingerprint(x, y),
            "torch": torch.__version__,
            "device": device_type,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    weights = cache_dir / f"{settings.arch}-{tag}-s{seed}-{key}.safetensors"
    sidecar = weights.with_suffix(".json")
    model = _build(settings, data)
    if weights.is_file() and sidecar.is_file():
        model.load_state_dict(load_file(str(weights)))
        info = json.loads(sidecar.read_text())
        info["cached"] = True
        return model.to(settings.device), info
    torch.manual_seed(seed)
    model = _build(settings, data)  # rebuilt after seeding so init depends only on the seed
    with _Timer(settings.device) as t:
        fit(
            model,
            x,
            y,
            epochs=settings.train.epochs,
            lr=settings.train.lr,
            batch_size=settings.train.batch_size,
            seed=seed,
            device=settings.device,
        )
    info = {"train_s": t.seconds, "device": settings.device, "n": int(x.shape[0])}
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    sidecar.write_text(json.dumps(info))
    info["cached"] = False
    return model.to(settings.device), info


@dataclass
class Split:
    forget: torch.Tensor  # indices into the training set
    retain: torch.Tensor
    probe: torch.Tensor  # member probe: a seeded subset of the retain indices
    retain_eval: torch.Tensor  # the retain indices RA is measured on
    test: torch.Tensor  # test indices used for TA and as MIA non-members


def make_split(scenario: str, settings: PaperSettings, data: BenchData, seed: int) -> Split:
    n = data.y_train.shape[0]
    gen = torch.Generator().manual_seed(10_000 + seed)
    if scenario == "classwise":
        mask = data.y_train == settings.forget_class
        # As in the paper's class-wise setting: TA over the remaining classes only.
        test = torch.nonzero(data.y_test != settings.forget_class).flatten()
    elif scenario == "random":
        k = max(1, int(round(settings.random_fraction * n)))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=gen)[:k]] = True
        test = torch.arange(data.y_test.shape[0])
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    forget = torch.nonzero(mask).flatten()
    retain = torch.nonzero(~mask).flatten()
    m = min(settings.member_probe_size, retain.numel())
    probe = retain[torch.randperm(retain.numel(), generator=gen)[:m]].sort().values
    r = (
        retain.numel()
        if settings.retain_eval_size is None
        else min(settings.retain_eval_size, retain.numel())
    )
    retain_eval = retain[torch.randperm(retain.numel(), generator=gen)[:r]].sort().values
    return Split(forget=forget, retain=retain, probe=probe, retain_eval=retain_eval, test=test)


def measure(
    model: nn.Module,
    data: BenchData,
    split: Split,
    settings: PaperSettings,
    extra_test: torch.Tensor | None,
) -> tuple[dict, float]:
    """The four headline numbers plus the engine's raw evaluation, and its wall time."""
    from worker.imu import evaluate
    from worker.imu.train import accuracy

    xt, yt = data.x_train, data.y_train
    with _Timer(settings.device) as t:
        ev = evaluate(
            model,
            forget=(xt[split.forget], yt[split.forget]),
            eval=(data.x_test[split.test], data.y_test[split.test]),
            member_probe=(xt[split.probe], yt[split.probe]),
        )
        retain_acc = accuracy(
            model, xt[split.retain_eval], yt[split.retain_eval], device=settings.device
        )
        extra = None
        if extra_test is not None and extra_test.numel():
            extra = accuracy(
                model, data.x_test[extra_test], data.y_test[extra_test], device=settings.device
            )
    # MIA: the confidence attack, the key the paper's codebase lineage reports.
    metrics = headline(ev["forget_acc"], retain_acc, ev["eval_acc"], ev["mia_confidence"])
    metrics["raw"] = {k: float(v) for k, v in ev.items() if isinstance(v, int | float)}
    metrics["raw"]["retain_acc"] = float(retain_acc)
    if extra is not None:
        metrics["raw"]["forget_class_test_acc"] = float(extra)
    return metrics, t.seconds


def policy_metrics(model: nn.Module, data: BenchData, split: Split, scenario: str) -> dict:
    """What the service's release policy judges: metrics on the policy half of the test set
    (the half no calibrated run looked at)."""
    from worker.job_metrics import job_metrics

    half = split.test[1::2]
    return job_metrics(
        model,
        forget=(data.x_train[split.forget], data.y_train[split.forget]),
        eval_pair=(data.x_test[half], data.y_test[half]),
        member_probe=None,
        class_wise=scenario == "classwise",
    )


def release_verdict(before: dict, after: dict, scenario: str) -> str:
    """The service's default release decision on this result: active | candidate."""
    from service.settings import Settings
    from service.trust.policy import decide, effective_policy

    policy = effective_policy(Settings(), None)
    return decide(policy, before, after, class_wise=scenario == "classwise")["decision"]


def _jsonable(obj: object) -> object:
    """Engine stats may hold tensors or numpy scalars; keep JSON plain."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    return str(obj)


def run_method(
    method: str,
    base: nn.Module,
    data: BenchData,
    split: Split,
    settings: PaperSettings,
    seed: int,
    scenario: str,
    cache_dir: Path = CACHE_DIR,
) -> tuple[nn.Module, dict]:
    """Apply one method; returns the resulting model and its timing/stat record."""
    from worker.imu import GAConfig, IMUConfig, gradient_ascent, unlearn

    xf, yf = data.x_train[split.forget], data.y_train[split.forget]
    guard_idx = split.test[::2]  # the calibrated rows may look at this half (as the service)
    guard = (data.x_test[guard_idx], data.y_test[guard_idx])
    class_wise = scenario == "classwise"
    if method == "retrain":
        model, info = train_cached(
            settings,
            data,
            data.x_train[split.retain],
            data.y_train[split.retain],
            seed=seed,
            tag=f"retrain-{scenario}",
            cache_dir=cache_dir,
        )
        return model, {"times": {"train_s": info["train_s"]}, "cached": info["cached"]}
    name, overrides = parse_method(method)
    model = copy.deepcopy(base)
    if name == "ga":
        ga_cfg = GAConfig.from_overrides(
            asdict(settings.ga)
            | {"calibration": "off", "seed": seed, "device": settings.device}
            | overrides
        )
        with _Timer(settings.device) as t:
            res = gradient_ascent(model, xf, yf, ga_cfg)
    elif name == "ga_cal":
        ga_cfg = GAConfig.from_overrides({"seed": seed, "device": settings.device} | overrides)
        with _Timer(settings.device) as t:
            res = gradient_ascent(model, xf, yf, ga_cfg, heldout=guard, class_wise=class_wise)
    elif name in ("imu_train", "imu_eval"):
        cfg = IMUConfig.from_overrides(
            {
                "backbone_mode": name.split("_", 1)[1],
                "seed": seed,
                "device": settings.device,
                "calibration": "off",
            }
            | overrides
        )
        with _Timer(settings.device) as t:
            res = unlearn(model, xf, yf, cfg)
    elif name == "imu_cal":
        cfg = IMUConfig.from_overrides({"seed": seed, "device": settings.device} | overrides)
        with _Timer(settings.device) as t:
            res = unlearn(model, xf, yf, cfg, heldout=guard, class_wise=class_wise)
    else:
        raise ValueError(f"unknown method {method!r}")
    # Per-sample lists (kept indices, weights) are bulky and not needed for the tables.
    stats = _jsonable({k: v for k, v in res.stats.items() if k not in ("kept_indices", "weights")})
    phases = stats.pop("seconds", None) or stats.pop("timings", None) or {}
    times = {"unlearn_s": t.seconds}
    if isinstance(phases, dict):
        times.update({f"phase_{k}": v for k, v in phases.items()})
    return res.model, {"times": times, "stats": stats}


def run_paper(settings: PaperSettings, *, log=print, cache_dir: Path = CACHE_DIR) -> dict:
    data = load_bench_data(
        n_train=settings.n_train, n_test=settings.n_test, seed=0, prefer=settings.data
    )
    runs: list[dict] = []
    bases: dict[int, dict] = {}
    probe_model = _build(settings, data)
    has_batchnorm = bool(batchnorm_layers(probe_model))
    n_params = sum(p.numel() for p in probe_model.parameters())
    for seed in settings.seeds:
        base, base_info = train_cached(
            settings, data, data.x_train, data.y_train, seed=seed, tag="base", cache_dir=cache_dir
        )
        bases[seed] = {"train_s": base_info["train_s"], "cached": base_info["cached"]}
        how = "cached" if base_info["cached"] else f"trained in {base_info['train_s']:.1f}s"
        log(f"[{settings.arch}] seed {seed}: base model ({how})")
        for scenario in settings.scenarios:
            split = make_split(scenario, settings, data, seed)
            extra = (
                torch.nonzero(data.y_test == settings.forget_class).flatten()
                if scenario == "classwise"
                else None
            )
            metrics, eval_s = measure(base, data, split, settings, extra)
            judge_before = policy_metrics(base, data, split, scenario)
            runs.append(
                {
                    "scenario": scenario,
                    "seed": seed,
                    "method": "original",
                    "metrics": metrics,
                    "times": {"evaluate_s": eval_s},
                    "n_forget": int(split.forget.numel()),
                }
            )
            for method in (*settings.methods, *settings.variants):
                model, rec = run_method(
                    method, base, data, split, settings, seed, scenario, cache_dir
                )
                metrics, eval_s = measure(model, data, split, settings, extra)
                rec["times"]["evaluate_s"] = eval_s
                if method != "retrain":
                    verdict = release_verdict(
                        judge_before, policy_metrics(model, data, split, scenario), scenario
                    )
                    rec["policy_decision"] = verdict
                    rec["released"] = 1.0 if verdict == "active" else 0.0
                runs.append(
                    {
                        "scenario": scenario,
                        "seed": seed,
                        "method": method,
                        "metrics": metrics,
                        "n_forget": int(split.forget.numel()),
                        **rec,
                    }
                )
                m = metrics
                log(
                    f"[{settings.arch}] {scenario:9s} s{seed} {method:9s} UA {m['ua']:6.2f} "
                    f"RA {m['ra']:6.2f} TA {m['ta']:6.2f} MIA {m['mia']:6.2f} "
                    f"({', '.join(f'{k} {v:.2f}' for k, v in rec['times'].items())})"
                )
                del model
    add_gaps(runs)
    return {
        "kind": "paper",
        "arch": settings.label or settings.arch,
        "meta": environment(settings.device)
        | {
            "data": data.describe(),
            "seeds": list(settings.seeds),
            "batchnorm": has_batchnorm,
            "n_params": n_params,
            "settings": _jsonable(asdict(settings)),
            "base_models": {str(k): v for k, v in bases.items()},
        },
        "runs": runs,
    }


def environment(device: str) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = platform.processor() or platform.machine()
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=BENCH_DIR,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def write_result(result: dict, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"paper_{result['arch']}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cnn", choices=["cnn", "resnet18_cifar", DIGITS])
    parser.add_argument("--preset", default="default", choices=["default", "full", "quick"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    settings = preset(args.preset, args.arch, args.device)
    if args.seeds:
        settings = replace(settings, seeds=list(args.seeds))
    path = write_result(run_paper(settings), args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
