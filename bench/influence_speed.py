"""Influence speed: the authors' per-sample procedure vs the closed form vs torch.func.

For each architecture (ResNet-18 and the small CNN, 32x32x3 inputs, 10 classes) and each
n, time four things on the same random inputs, θ = the final Linear:

* ``forward``     one batched eval-mode forward over the n inputs (the floor: no method can
                  avoid reading the data through the network once);
* ``closed_form`` worker.imu's fast path (one batched forward + a few matrix products);
* ``func``        worker.imu's generic torch.func path (vmap over per-sample grads);
* ``loop``        the authors' procedure: two batch-of-one loops (Fisher + mean gradient,
                  then the per-sample scores).

Targets (issue 4): closed_form <= 1.5x forward; on a GPU loop >= 50x closed_form at n=4096;
the closed form's peak memory must not grow with (#classifier parameters x n) — measured
in fresh subprocesses with a 10-class and a 1000-class head (peak RSS on the CPU, peak
allocated memory on CUDA).

Usage:
    python -m bench.influence_speed            # CPU: --quick implied (ResNet width 8)
    python -m bench.influence_speed --full     # paper-size ResNet-18 (width 64); GPU
Writes bench/results/influence_speed.json (+ .png) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(arch: str, width: int, num_classes: int, device: torch.device) -> torch.nn.Module:
    from worker.imu.architectures import build

    torch.manual_seed(0)
    if arch == "resnet18_cifar":
        model = build(arch, num_classes=num_classes, in_channels=3, width=width)
    else:
        model = build(arch, in_channels=3, num_classes=num_classes, width=width)
    # Non-trivial BatchNorm statistics, as in a trained model.
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 32, 32))
    return model.eval().to(device)


def _data(n: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x.to(device), y.to(device)


@torch.no_grad()
def batched_forward(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    for start in range(0, x.shape[0], batch_size):
        model(x[start : start + batch_size])


def _run(method: str, model, x, y, batch_size: int) -> torch.Tensor | None:
    from worker.imu import compute_influence

    if method == "forward":
        batched_forward(model, x, batch_size)
        return None
    res = compute_influence(model, x, y, batch_size=batch_size, method=method)
    assert res.method == method, (res.method, method)
    return res.scores


def _time(method: str, model, x, y, batch_size: int, repeats: int, device) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = _run(method, model, x, y, batch_size)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


# --------------------------------------------------------------------------- memory probe


def memory_probe(
    arch: str, width: int, num_classes: int, n: int, method: str, batch_size: int, device_name: str
) -> dict[str, Any]:
    """Run in a fresh process: peak memory of one method beyond the set-up (model + data)."""
    device = torch.device(device_name)
    model = _model(arch, width, num_classes, device)
    x, y = _data(n, num_classes, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    _run(method, model, x, y, batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss()
    head = model.fc
    theta = head.weight.numel() + head.bias.numel()
    return {
        "arch": arch,
        "width": width,
        "num_classes": num_classes,
        "n": n,
        "method": method,
        "feature_dim": head.in_features,
        "theta_numel": theta,
        "extra_peak_mb": max(0, peak - base) / 2**20,
        "n_times_theta_mb": n * theta * x.element_size() / 2**20,
        "n_times_features_plus_classes_mb": n
        * (head.in_features + num_classes)
        * x.element_size()
        / 2**20,
        "measure": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "VmHWM - VmRSS at start (peak reset via /proc/self/clear_refs; "
        "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS)",
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak-RSS mark (Linux >= 4.0) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _probe_subprocess(args: list[str], threads: int) -> dict[str, Any]:
    # Large blocks mmapped and returned on free: the RSS then follows the live tensors.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "bench.influence_speed", "--memory-probe", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.add_argument("--full", action="store_true", help="paper-size widths even on the CPU")
    p.add_argument("--quick", action="store_true", help="small widths (default on the CPU)")
    p.add_argument("--ns", default="256,1024,4096", help="comma-separated forget-set sizes")
    p.add_argument("--archs", default="resnet18_cifar,cnn")
    p.add_argument("--resnet-width", type=int, default=None)
    p.add_argument("--cnn-width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="best of R for the fast methods (default 2 quick, 3 full)",
    )
    p.add_argument(
        "--loop-max-n",
        type=int,
        default=None,
        help="skip the per-sample loop above this n (default: run all)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: stable numbers on a shared machine; every "
        "method runs with the same setting)",
    )
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "influence_speed.json"))
    p.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a results file")
    p.add_argument(
        "--memory-probe",
        nargs=7,
        metavar=("ARCH", "WIDTH", "C", "N", "METHOD", "BS", "DEVICE"),
        help=argparse.SUPPRESS,
    )
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)

    if args.plot_only:
        src = Path(args.plot_only)
        _plot(json.loads(src.read_text()), src.with_suffix(".png"))
        return 0

    if args.memory_probe:
        a, w, c, n, m, bs, dev = args.memory_probe
        print(json.dumps(memory_probe(a, int(w), int(c), int(n), m, int(bs), dev)))
        return 0

    from worker.imu.config import resolve_device

    device = resolve_device(args.device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    widths = {
        "resnet18_cifar": args.resnet_width or (8 if quick else 64),
        "cnn": args.cnn_width or (16 if quick else 32),
    }
    if args.repeats is None:
        args.repeats = 2 if quick else 3
    ns = [int(v) for v in args.ns.split(",")]
    archs = [a.strip() for a in args.archs.split(",")]
    methods = ["forward", "closed_form", "func", "loop"]
    rows: list[dict[str, Any]] = []
    parity: dict[str, float] = {}
    t_start = time.perf_counter()

    for arch in archs:
        model = _model(arch, widths[arch], 10, device)
        xw, yw = _data(64, 10, device)
        for m in methods:  # warm-up: allocator, vmap tracing, kernels
            _run(
                m,
                model,
                xw[:16] if m == "loop" else xw,
                yw[:16] if m == "loop" else yw,
                args.batch_size,
            )
        for n in ns:
            x, y = _data(n, 10, device)
            outs: dict[str, torch.Tensor | None] = {}
            best: dict[str, float] = {}
            # Repeats interleave the methods, so a load spike on a shared machine hits all
            # of them alike instead of one method's whole series.
            for rep in range(args.repeats):
                for m in methods:
                    if m == "loop" and (
                        rep > 0 or (args.loop_max_n is not None and n > args.loop_max_n)
                    ):
                        continue
                    secs, outs[m] = _time(m, model, x, y, args.batch_size, 1, device)
                    best[m] = min(best.get(m, float("inf")), secs)
            for m, secs in best.items():
                reps = 1 if m == "loop" else args.repeats
                rows.append({"arch": arch, "n": n, "method": m, "seconds": secs, "repeats": reps})
                print(f"  {arch:15s} n={n:5d} {m:12s} {secs:9.4f}s", flush=True)
            ref = outs.get("loop")
            for m in ("closed_form", "func"):
                if ref is not None and outs.get(m) is not None:
                    err = float((outs[m] - ref).abs().max() / ref.abs().max())
                    parity[f"{arch}/n={n}/{m}_vs_loop"] = err

    def secs(arch: str, n: int, m: str) -> float | None:
        for r in rows:
            if (r["arch"], r["n"], r["method"]) == (arch, n, m):
                return r["seconds"]
        return None

    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for arch in archs:
        ratios[arch] = {}
        for n in ns:
            fwd, cf = secs(arch, n, "forward"), secs(arch, n, "closed_form")
            fn, lp = secs(arch, n, "func"), secs(arch, n, "loop")
            ratios[arch][str(n)] = {
                "closed_form_over_forward": cf / fwd if cf and fwd else None,
                "func_over_closed_form": fn / cf if fn and cf else None,
                "loop_over_closed_form": lp / cf if lp and cf else None,
                "loop_over_func": lp / fn if lp and fn else None,
            }

    memory: list[dict[str, Any]] = []
    if not args.no_memory:
        arch, w = "cnn", widths["cnn"]
        probes = [(c, 4096, m) for c in (10, 1000) for m in ("forward", "closed_form")]
        # n scaling of the closed form, and the generic path (materialises chunk x |θ|).
        probes += [(1000, 1024, "forward"), (1000, 1024, "closed_form"), (1000, 1024, "func")]
        for c, n, m in probes:
            memory.append(
                _probe_subprocess(
                    [arch, str(w), str(c), str(n), m, str(args.batch_size), str(device)],
                    args.threads,
                )
            )

    largest = max(ns)
    targets: dict[str, Any] = {
        "closed_form_over_forward_max": max(
            (
                v["closed_form_over_forward"]
                for a in ratios.values()
                for v in a.values()
                if v["closed_form_over_forward"] is not None
            ),
            default=None,
        ),
        "closed_form_over_forward_target": 1.5,
        f"loop_over_closed_form_at_n{largest}": {
            a: ratios[a][str(largest)]["loop_over_closed_form"] for a in archs
        },
        "loop_over_closed_form_target_gpu": 50.0,
    }
    targets["closed_form_within_1_5x_forward"] = (
        targets["closed_form_over_forward_max"] is not None
        and targets["closed_form_over_forward_max"] <= 1.5
    )
    if memory:
        cf = {(r["num_classes"], r["n"]): r for r in memory if r["method"] == "closed_form"}
        fw = {(r["num_classes"], r["n"]): r for r in memory if r["method"] == "forward"}
        extra = {k: cf[k]["extra_peak_mb"] - fw[k]["extra_peak_mb"] for k in cf}
        targets["closed_form_extra_mb_over_forward"] = {
            f"C={c},n={n}": v for (c, n), v in extra.items()
        }
        # Growth of the closed form's extra memory from a 10- to a 1000-class head, relative
        # to the growth of n x |θ| (what materialised per-sample gradients would cost).
        growth = {
            f"n={n}": (cf[(1000, n)]["extra_peak_mb"] - cf[(10, n)]["extra_peak_mb"])
            / (cf[(1000, n)]["n_times_theta_mb"] - cf[(10, n)]["n_times_theta_mb"])
            for n in sorted({k[1] for k in cf})
            if (10, n) in cf and (1000, n) in cf
        }
        targets["closed_form_memory_growth_over_n_times_theta_growth"] = growth
        targets["memory_does_not_scale_with_n_times_theta"] = all(v < 0.05 for v in growth.values())

    result = {
        "benchmark": "influence_speed",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "quick": quick,
        "command": " ".join(["python -m bench.influence_speed", *(argv or sys.argv[1:])]),
        "config": {
            "archs": {
                a: {
                    "width": widths[a],
                    "input": [3, 32, 32],
                    "num_classes": 10,
                    "theta": "fc (final Linear)",
                }
                for a in archs
            },
            "ns": ns,
            "batch_size": args.batch_size,
            "repeats_fast_methods": args.repeats,
            "loop_max_n": args.loop_max_n,
            "dtype": "float32",
        },
        "results": rows,
        "ratios": ratios,
        "parity_max_rel_err_vs_loop": parity,
        "memory": memory,
        "targets": targets,
        "wall_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    if not args.no_plot:
        _plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(
        f"\ninfluence speed on {result['device']} ({result['device_name']}), "
        f"torch {result['torch']}, {result['threads']} threads, quick={result['quick']}"
    )
    head = f"{'arch':15s} {'n':>5s} {'forward':>9s} {'closed':>9s} {'func':>9s} {'loop':>9s}"
    print(head + f" {'cf/fwd':>7s} {'loop/cf':>8s}")
    by = {(r["arch"], r["n"], r["method"]): r["seconds"] for r in result["results"]}
    for arch, per_n in result["ratios"].items():
        for n, rt in per_n.items():
            cells = [by.get((arch, int(n), m)) for m in ("forward", "closed_form", "func", "loop")]
            txt = " ".join(f"{c:9.3f}" if c is not None else f"{'-':>9s}" for c in cells)
            cf = rt["closed_form_over_forward"]
            lp = rt["loop_over_closed_form"]
            print(
                f"{arch:15s} {int(n):5d} {txt} {cf:7.2f} "
                + (f"{lp:8.1f}" if lp is not None else f"{'-':>8s}")
            )
    for r in result["memory"]:
        print(
            f"memory {r['method']:12s} C={r['num_classes']:5d} n={r['n']:5d}: "
            f"+{r['extra_peak_mb']:8.1f} MB (n x |θ| would be {r['n_times_theta_mb']:8.1f} MB)"
        )
    print("targets:", json.dumps(result["targets"], indent=None))


def _plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as exc:  # noqa: BLE001 - the plot is optional
        print(f"no plot: {exc}")
        return
    archs = list(result["ratios"])
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for method in ("forward", "closed_form", "func", "loop"):
            pts = sorted(
                (r["n"], r["seconds"])
                for r in result["results"]
                if r["arch"] == arch and r["method"] == method
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        width = result["config"]["archs"][arch]["width"]
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="n (forget-set size)",
            ylabel="seconds",
            title=f"{arch} (width {width}) on {result['device']}",
        )
        ns = sorted({r["n"] for r in result["results"]})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
