"""`make bench`: regenerate every benchmark result, RESULTS.md and the plots.

    python -m bench.run_all                 # CPU default settings (~20 min on 2 cores)
    python -m bench.run_all --device cuda   # same settings on a GPU
    python -m bench.run_all --full --device cuda   # whole Fashion-MNIST, wider ResNet, 3 seeds
    python -m bench.run_all --report-only   # rebuild RESULTS.md and plots from the JSON

Steps: the paper comparison for each architecture (bench/paper.py, base models cached in
bench/.cache), the influence-speed benchmark (bench/influence_speed.py, run as its own
process), the API throughput benchmark (bench/api_throughput.py: SQLite and PostgreSQL, needs
wrk), the calibration probe (bench/calibration_probe.py: default requests on untuned
Fashion-MNIST models), the language-model fixture runs (bench/lm_fixture_runs.py, ~40 CPU-s),
the release-honesty benchmark (bench/release_honesty.py: 25 default requests against
retraining, ~10 min), then bench/report.py (plus the LM section from lm_fixture.json).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import lm_fixture_runs, paper, report

BENCH_DIR = Path(__file__).resolve().parent
ARCHS = ("cnn", "resnet18_cifar", paper.DIGITS)
QUICK_DIR = BENCH_DIR / ".cache" / "quick"


def run_speed(device: str, results: Path, extra: list[str]) -> int:
    """bench/influence_speed.py belongs to the engine; run it unchanged in its own process."""
    cmd = [
        sys.executable,
        "-m",
        "bench.influence_speed",
        "--device",
        device,
        "--out",
        str(results / "influence_speed.json"),
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate all Lethe benchmark results.")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--full",
        action="store_true",
        help="whole dataset, wider ResNet, more epochs, 3 seeds (GPU)",
    )
    size.add_argument("--quick", action="store_true", help="tiny smoke-test settings")
    parser.add_argument(
        "--arch", action="append", choices=ARCHS, help="only these architectures (repeatable)"
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-api", action="store_true", help="skip bench/api_throughput.py")
    parser.add_argument("--skip-probe", action="store_true", help="skip bench/calibration_probe.py")
    parser.add_argument("--skip-lm", action="store_true", help="skip bench/lm_fixture_runs.py")
    parser.add_argument("--skip-honesty", action="store_true", help="skip bench/release_honesty.py")
    parser.add_argument("--skip-burst", action="store_true", help="skip bench/burst.py")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--speed-args", default="", help="extra arguments passed to bench.influence_speed (quoted)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results folder (default bench/results; --quick: bench/.cache/quick)",
    )
    args = parser.parse_args(argv)
    if args.results is None:
        # Quick runs must never overwrite the committed results.
        args.results = QUICK_DIR / "results" if args.quick else paper.RESULTS_DIR
    out_md = (
        BENCH_DIR / "RESULTS.md"
        if args.results == paper.RESULTS_DIR
        else (args.results.parent / "RESULTS.md")
    )

    name = "full" if args.full else "quick" if args.quick else "default"
    started = time.perf_counter()
    failures = []
    if not (args.report_only or args.skip_paper):
        for arch in args.arch or ARCHS:
            settings = paper.preset(name, arch, args.device)
            if args.seeds:
                settings = replace(settings, seeds=list(args.seeds))
            t0 = time.perf_counter()
            result = paper.run_paper(settings, log=lambda m: print(m, flush=True))
            path = paper.write_result(result, args.results)
            print(f"wrote {path} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if not (args.report_only or args.skip_speed):
        t0 = time.perf_counter()
        extra = args.speed_args.split()
        if args.full:
            extra.insert(0, "--full")
        elif args.quick:
            extra = ["--ns", "32,64", "--archs", "cnn", "--no-memory", *extra]
        rc = run_speed(args.device, args.results, extra)
        if rc != 0:
            failures.append(f"bench.influence_speed exited with {rc}")
        print(f"influence speed done ({time.perf_counter() - t0:.0f}s)", flush=True)
    if not (args.report_only or args.skip_api):
        cmd = [
            sys.executable,
            "-m",
            "bench.api_throughput",
            "--out",
            str(args.results / "api_throughput.json"),
        ]
        if args.quick:
            cmd += ["--duration", "2", "--backends", "sqlite"]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode
        if rc != 0:
            failures.append(f"bench.api_throughput exited with {rc}")
    if not (args.report_only or args.skip_probe or args.quick):
        cmd = [
            sys.executable,
            "-m",
            "bench.calibration_probe",
            "--out",
            str(args.results / "calibration_probe.json"),
        ]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode != 0:
            failures.append("bench.calibration_probe failed")
    if not (args.report_only or args.skip_lm or args.quick):
        cmd = [
            sys.executable,
            "-m",
            "bench.lm_fixture_runs",
            "--out",
            str(args.results / "lm_fixture.json"),
        ]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode
        if rc != 0:
            failures.append(f"bench.lm_fixture_runs exited with {rc}")
    if not (args.report_only or args.skip_honesty or args.quick):
        cmd = [
            sys.executable,
            "-m",
            "bench.release_honesty",
            "--out",
            str(args.results / "release_honesty.json"),
        ]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode != 0:
            failures.append("bench.release_honesty failed")
    if not (args.report_only or args.skip_burst or args.quick):
        cmd = [sys.executable, "-m", "bench.burst", "--out", str(args.results / "burst.json")]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode != 0:
            failures.append("bench.burst failed")
    decision = report.build_report(args.results, out_md)
    lm_section = lm_fixture_runs.section(args.results / "lm_fixture.json")
    if lm_section:
        out_md.write_text(out_md.read_text().rstrip("\n") + "\n\n" + lm_section)
    print(f"wrote {out_md}; backbone_mode decision: {decision.get('choice')}")
    print(f"total {time.perf_counter() - started:.0f}s")
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
