"""API throughput against the stack's own floor: `lethe serve` on SQLite and on PostgreSQL.

    python -m bench.api_throughput [--duration 10] [--connections 100] [--backends sqlite,postgres]
                                   [--out bench/results/api_throughput.json] [--plot FILE.png]

For each backend it starts a real `lethe serve --no-executor` (default worker count for that
database) on a free port, registers a small dataset and model, and drives it with `wrk`
(`apt-get install wrk`) at 100 connections, each route for `--duration` seconds:

- `healthz`: GET /healthz — no auth, no database: the floor of this server on this machine;
- `get_job`: GET /v1/jobs/{id} with a bearer key;
- `list_jobs`: GET /v1/jobs (first page, default limit 50);
- `post_deletion`: POST /v1/deletion-requests, each naming a record key no other request names
  (keys already queued are refused, so a repeated body would only measure the 422 path).

The executor is off so that only the API is measured (queued jobs stay queued; POST therefore
also pays for the growing backlog check). Every non-2xx answer is counted and reported. Ratios
are req/s of a route over the same server's /healthz req/s. Goals (issue 17): get_job ≥ 0.5,
post_deletion ≥ 0.2. PostgreSQL: LETHE_TEST_PG_ADMIN (default
postgresql+psycopg://postgres@127.0.0.1:5432/test); a throwaway database is created and dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from service.devtools.localserver import LocalService

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
PG_ADMIN_URL = os.environ.get(
    "LETHE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
GOALS = {"get_job": 0.5, "post_deletion": 0.2}
ROUTES = ("healthz", "get_job", "list_jobs", "post_deletion")
KEYS_PER_THREAD = 20_000

# wrk gives each thread its own Lua state: thread i names keys r{i*KEYS_PER_THREAD + n}.
POST_LUA = r"""
-- Globals on purpose: thread:set/get reach only globals of each thread's Lua state.
counter = 0
base = 0
threads = {}
failed = nil
function setup(thread)
  thread:set("base", #threads * %(per)d)
  table.insert(threads, thread)
end
function response(status, headers, body)
  if status >= 300 and failed == nil then failed = status .. " " .. body end
end
function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    local sample = thread:get("failed")
    if sample then io.write("FIRST-FAILURE: " .. sample .. "\n") end
  end
end
function request()
  counter = counter + 1
  local body = string.format(
    '{"model":"%(model)s","dataset":"%(dataset)s","record_keys":["r%%d"],"method":"ga"}',
    base + counter)
  return wrk.format("POST", "/v1/deletion-requests",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(key)s"}, body)
end
"""


def _unit_seconds(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    if not match:
        raise ValueError(f"unparsable wrk latency {value!r}")
    number, unit = float(match.group(1)), match.group(2)
    return number * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    """req/s, p50/p99 (ms), request and non-2xx counts from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s*50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    failure = re.search(r"^FIRST-FAILURE: (.*)$", output, re.M)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"could not parse wrk output:\n{output}")
    return {
        "req_per_s": round(float(rps.group(1)), 1),
        "p50_ms": round(_unit_seconds(p50.group(1)) * 1000, 2),
        "p99_ms": round(_unit_seconds(p99.group(1)) * 1000, 2),
        "requests": int(total.group(1)),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else None,
        "first_failure": failure.group(1)[:500] if failure else None,
    }


def run_wrk(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
) -> dict[str, Any]:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "30s",
    ]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
    return parse_wrk(out.stdout)


def _fixture_files(folder: Path, records: int) -> tuple[Path, Path]:
    """A tensor dataset of `records` rows and matching `mlp` weights (4 → 8 → 2)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from worker.imu.architectures import build

    rng = np.random.default_rng(0)
    data = folder / "bench.npz"
    np.savez(
        data,
        ids=np.array([f"r{i}" for i in range(records)]),
        inputs=rng.normal(size=(records, 4)).astype(np.float32),
        labels=rng.integers(0, 2, size=records).astype(np.int64),
    )
    torch.manual_seed(0)
    model = build("mlp", in_features=4, hidden=[8], num_classes=2)
    weights = folder / "bench.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return data, weights


SEED_JOBS = 60


def _seed(
    service: LocalService, key: str, data: Path, weights: Path, records: int
) -> dict[str, str]:
    """Register the dataset and model and submit a few jobs; returns ids for the routes."""
    from service.cli.api_client import LetheClient

    with LetheClient(service.url, key, timeout=120) as api:
        dataset = api.upload_dataset(data, name="bench", kind="tensor", role="train")
        api.register_model(
            {
                "name": "bench",
                "architecture": "mlp",
                "arch_kwargs": {"in_features": 4, "hidden": [8], "num_classes": 2},
            },
            weights,
        )
        # The last keys, above every wrk thread's range: the POST run never collides with them.
        jobs = [
            api.submit_deletion("bench", dataset["id"], [f"r{records - 1 - i}"], method="ga")[
                "job"
            ]["id"]
            for i in range(SEED_JOBS)
        ]
    return {"dataset": dataset["id"], "job": jobs[-1]}


def _pg_database() -> tuple[str, Any]:
    from sqlalchemy import create_engine, text

    name = f"lethe_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def bench_backend(
    backend: str,
    *,
    duration: float,
    connections: int,
    threads: int,
    records: int,
    workers: int | None,
    log: Any = print,
) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix=f"lethe-api-bench-{backend}-"))
    env = {"LETHE_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    drop = None
    if backend == "postgres":
        url, drop = _pg_database()
        env["LETHE_DATABASE_URL"] = url
    extra = ["--no-executor"] + (["--workers", str(workers)] if workers else [])
    service = LocalService(home, env=env, embedded=backend == "sqlite")
    try:
        service.migrate()
        key = service.create_key("admin", name="bench")
        data, weights = _fixture_files(home, records)
        t0 = time.perf_counter()
        service.start(extra_args=extra, timeout=180)
        startup_s = time.perf_counter() - t0
        ids = _seed(service, key, data, weights, records)
        first = httpx.get(f"{service.url}/healthz", timeout=10)
        auth = {"Authorization": f"Bearer {key}"}
        script = home / "post.lua"
        per_thread = (records - SEED_JOBS) // threads
        script.write_text(
            POST_LUA % {"per": per_thread, "model": "bench", "dataset": ids["dataset"], "key": key}
        )
        targets = {
            "healthz": (f"{service.url}/healthz", {}, None),
            "get_job": (f"{service.url}/v1/jobs/{ids['job']}", auth, None),
            "list_jobs": (f"{service.url}/v1/jobs", auth, None),
            "post_deletion": (f"{service.url}/v1/deletion-requests", {}, script),
        }
        routes: dict[str, Any] = {}
        for route in ROUTES:
            target, headers, lua = targets[route]
            routes[route] = run_wrk(
                target,
                duration=duration,
                connections=connections,
                threads=threads,
                headers=headers,
                script=lua,
            )
            log(f"  {backend:8s} {route:14s} {routes[route]}")
        floor = routes["healthz"]["req_per_s"]
        for result in routes.values():
            result["ratio_to_healthz"] = round(result["req_per_s"] / floor, 3) if floor else None
        log_tail = service.log_tail(20)
        return {
            "backend": backend,
            "workers": workers or "auto",
            "startup_s": round(startup_s, 2),
            "healthz_after_start": first.status_code,
            "routes": routes,
            "goals": {
                route: {
                    "goal": goal,
                    "ratio": routes[route]["ratio_to_healthz"],
                    "met": (routes[route]["ratio_to_healthz"] or 0) >= goal,
                }
                for route, goal in GOALS.items()
            },
            "server_log_tail": log_tail if "Traceback" in log_tail else "",
        }
    finally:
        service.stop()
        if drop is not None:
            drop()
        shutil.rmtree(home, ignore_errors=True)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = result["backends"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(backends))
    for i, entry in enumerate(backends):
        xs = [j + i * width for j in range(len(ROUTES))]
        axes[0].bar(
            xs, [entry["routes"][r]["req_per_s"] for r in ROUTES], width, label=entry["backend"]
        )
        axes[1].bar(
            xs, [entry["routes"][r]["p99_ms"] for r in ROUTES], width, label=entry["backend"]
        )
    for ax, title in zip(axes, ("req/s (higher is better)", "p99 latency, ms"), strict=True):
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(ROUTES))])
        ax.set_xticklabels(ROUTES, rotation=15)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(
        f"lethe serve, wrk -c{result['connections']} -d{result['duration_s']}s "
        f"on {result['machine']['cpus']} CPUs"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per route")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        help="dataset size (default: enough keys for the POST run)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="uvicorn worker processes (default: lethe serve's choice)",
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--out", type=Path, default=RESULTS / "api_throughput.json")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG path (default: beside --out, api_throughput.png)",
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    records = args.records or args.threads * KEYS_PER_THREAD + SEED_JOBS
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "api_throughput",
        "created_at": datetime.now(UTC).isoformat(),
        "duration_s": args.duration,
        "connections": args.connections,
        "wrk_threads": args.threads,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "goals": GOALS,
        "backends": [],
    }
    for backend in args.backends.split(","):
        result["backends"].append(
            bench_backend(
                backend.strip(),
                duration=args.duration,
                connections=args.connections,
                threads=args.threads,
                records=records,
                workers=args.workers,
            )
        )
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(result, plot_path)
    print(f"wrote {args.out} and {plot_path} ({result['wall_s']}s)")
    for entry in result["backends"]:
        for route, goal in entry["goals"].items():
            verdict = "met" if goal["met"] else "MISSED"
            print(
                f"{entry['backend']}: {route} {goal['ratio']}× healthz (goal {goal['goal']}×) "
                f"{verdict}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
