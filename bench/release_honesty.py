"""Released means forgotten, measured: default requests against models retrained without them.

    python -m bench.release_honesty [--out bench/results/release_honesty.json]

For every family of bench/families.py and every request kind (3, 10 and 30 random records,
one whole class, and 3 mislabelled records where labels were flipped), a deletion request
with no parameters goes through the API to a real worker process (the embedded executor on
SQLite) with the production policy, twice:

- **approximate**: the model registered without a recipe (IMU alone);
- **escalation**: registered with its recipe, so a result IMU cannot show forgotten is
  retrained without the records.

Each released model is downloaded and scored against the family's recipe retrained without
the records (the reference), on records the service never saw:
- GOOD: released; its membership Z no higher than max(reference Z, 0) + 1.96 (the reference
  is one draw of a statistic that is about N(0, 1) across retrains); forget accuracy within
  0.1 + 1/n of the reference's; held-out accuracy drop ≤ 0.03;
- FALSE RELEASE: released, but remembering where the reference forgot;
- DAMAGED: released and forgotten, but held-out accuracy dropped by more than 0.03;
- HELD: needs_review (the reason is kept).
Timings: the job's total, and a plain retrain of the recipe (what a user would do instead).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.families import MEMORISING, Family, family, request_rows

FAMILIES = ("digits-mlp", "digits-cnn", "breast-cancer-mlp", "fashion-mlp", "flipped", "noisy")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "release_honesty.json"


def kinds(fam: Family) -> list[str]:
    out = ["random3", "random10", "random30", "class" if fam.n_classes > 2 else "random60"]
    return out + (["mislabelled3"] if fam.flipped else [])


def judge(fam: Family, rows: list[int], class_wise: bool, request: dict, weights: bytes | None):
    """The verdict on one request, and the numbers behind it."""
    reference = fam.retrained(rows)
    theirs = fam.evidence(reference, rows, class_wise)
    skip = int(fam.y[rows[0]]) if class_wise else None
    out: dict[str, Any] = {
        "reference": {
            "z": round(theirs.statistic, 3),
            "outcome": theirs.outcome,
            "forget_acc": round(fam.forget_acc(reference, rows), 4),
            "heldout_acc": round(fam.heldout_acc(reference, skip), 4),
        },
        "status": request["status"],
        "policy_reason": (request.get("policy") or {}).get("reason"),
        "forgetting": request.get("forgetting"),
        "attempts": [(a["method"], a["outcome"]) for a in request.get("attempts") or []],
    }
    if request["status"] != "completed" or weights is None:
        out["verdict"] = "HELD"
        return out
    released = fam.load(weights)
    ours = fam.evidence(released, rows, class_wise)
    f_ours, f_ref = fam.forget_acc(released, rows), out["reference"]["forget_acc"]
    drop = fam.heldout_acc(fam.model, skip) - fam.heldout_acc(released, skip)  # type: ignore[arg-type]
    # Rounded: a tolerance met exactly (0.9 against 0.7 + 0.2) is met.
    forgot = ours.statistic <= max(theirs.statistic, 0.0) + 1.96 and round(
        f_ours - f_ref, 9
    ) <= round(0.1 + 1.0 / len(rows), 9)
    out.update(
        released={
            "z": round(ours.statistic, 3),
            "outcome": ours.outcome,
            "forget_acc": round(f_ours, 4),
            "heldout_drop": round(drop, 4),
        },
        verdict="FALSE RELEASE" if not forgot else ("DAMAGED" if drop > 0.03 else "GOOD"),
    )
    return out


def run_family(fam: Family, stack: Any, *, with_recipe: bool) -> list[dict[str, Any]]:
    results = []
    for kind in kinds(fam):
        rows, class_wise = request_rows(fam, kind)
        keys = [fam.ids[i] for i in rows]
        recipe = fam.recipe_json() if with_recipe else None
        model = stack.register(fam.trained(), "model", recipe=recipe)
        job = stack.submit(model, keys)
        done = stack.wait([job], timeout=1800)[job]
        request = stack.client.get(
            f"/v1/deletion-requests/{done['request_id']}", headers=stack.headers
        ).json()
        weights = None
        if request["status"] == "completed":
            version = request["result_version"]["id"]
            weights = stack.client.get(
                f"/v1/model-versions/{version}/checkpoint", headers=stack.headers
            ).content
        t0 = time.perf_counter()
        fam._refs.pop(tuple(sorted(rows)), None)
        fam.retrained(rows)
        retrain_s = time.perf_counter() - t0
        row = {
            "family": fam.name,
            "kind": kind,
            "n": len(rows),
            "class_wise": class_wise,
            "memorises": fam.name in MEMORISING,
            "job_seconds": round(float((done.get("timings") or {}).get("total") or 0.0), 3),
            "plain_retrain_seconds": round(retrain_s, 3),
            **judge(fam, rows, class_wise, request, weights),
        }
        print(
            f"  {fam.name:18s} {kind:12s} {row['verdict']:13s} {row['status']:12s} "
            f"{row['policy_reason'] or '':28s} job {row['job_seconds']:6.2f}s "
            f"retrain {retrain_s:6.2f}s",
            flush=True,
        )
        results.append(row)
    return results


def counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    verdicts = ("GOOD", "FALSE RELEASE", "DAMAGED", "HELD")
    out: dict[str, Any] = {v: sum(r["verdict"] == v for r in rows) for v in verdicts}
    plain = [r for r in rows if not r["memorises"]]
    out["requests"] = len(rows)
    out["good_share_not_memorising"] = (
        round(sum(r["verdict"] == "GOOD" for r in plain) / len(plain), 3) if plain else None
    )
    return out


def section(results_dir: Path) -> list[str]:
    """The RESULTS.md section, from release_honesty.json (nothing when it is absent)."""
    path = results_dir / "release_honesty.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    passes = data["passes"]
    lines = [
        "## Released means forgotten (`bench/release_honesty.py`)",
        "",
        "Default requests (no parameters) through the API to a real worker process with the "
        "production policy, each scored against the family's recipe retrained without the "
        "records, on records the service never saw. GOOD: released, membership Z no higher "
        "than max(reference Z, 0) + 1.96, forget accuracy within 0.1 + 1/n of the "
        "reference's, held-out drop ≤ 0.03; FALSE RELEASE: released but remembering; "
        "DAMAGED: released, forgotten, drop > 0.03; HELD: needs_review. *approximate*: "
        "registered without a recipe (IMU alone); *escalation*: with its recipe (a result "
        "IMU cannot show forgotten is retrained without the records).",
        "",
        "| pass | requests | GOOD | FALSE RELEASE | DAMAGED | HELD | GOOD on models that "
        "do not memorise |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, p in passes.items():
        c = p["counts"]
        share = c.get("good_share_not_memorising")
        lines.append(
            f"| {label} | {c['requests']} | {c['GOOD']} | {c['FALSE RELEASE']} | "
            f"{c['DAMAGED']} | {c['HELD']} | {'-' if share is None else f'{share:.0%}'} |"
        )
    lines += [
        "",
        "| family | train / held-out acc | request | approximate | escalation |",
        "|---|---|---|---|---|",
    ]
    by = {
        label: {(r["family"], r["kind"]): r for r in p["requests"]} for label, p in passes.items()
    }
    first = next(iter(passes.values()))["requests"]
    for r in first:
        fam = data["families"][r["family"]]
        cells = []
        for label in passes:
            q = by[label].get((r["family"], r["kind"]))
            if q is None:
                cells.append("-")
                continue
            how = q["policy_reason"] or q.get("forgetting") or ""
            cells.append(f"{q['verdict']} ({how})")
        lines.append(
            f"| {r['family']} | {fam['train_acc']:.3f} / {fam['heldout_acc']:.3f} | "
            f"{r['kind']} (n={r['n']}) | {' | '.join(cells)} |"
        )
    lines += [
        "",
        "Seconds per request (job total as the worker booked it; plain retrain: the "
        "recipe alone in the bench process, what a user would run instead):",
        "",
        "| family | IMU job (median) | escalated job (median) | plain retrain (median) |",
        "|---|---|---|---|",
    ]
    for name in data["families"]:

        def med(rows: list[float]) -> str:
            return f"{sorted(rows)[len(rows) // 2]:.2f}" if rows else "-"

        imu = [
            r["job_seconds"]
            for r in passes.get("approximate", {}).get("requests", [])
            if r["family"] == name
        ]
        esc = [
            r["job_seconds"]
            for r in passes.get("escalation", {}).get("requests", [])
            if r["family"] == name and r.get("forgetting") == "exact"
        ]
        plain = [
            r["plain_retrain_seconds"]
            for p in passes.values()
            for r in p["requests"]
            if r["family"] == name
        ]
        lines.append(f"| {name} | {med(imu)} | {med(esc)} | {med(plain)} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    from tests.worker.harness import WorkerProcess, api_stack, production_policy, stack_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--family", action="append", choices=FAMILIES)
    args = parser.parse_args(argv)
    production = production_policy()
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "policy": production,
        "passes": {},
        "families": {},
    }
    fams = []
    for name in args.family or FAMILIES:
        try:
            fam = family(name)
        except FileNotFoundError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        everything = list(range(len(fam.y)))
        results["families"][name] = {
            "architecture": fam.architecture,
            "n_train": len(fam.y),
            "n_eval": len(fam.y_eval),
            "train_acc": round(fam.forget_acc(fam.model, everything), 4),  # type: ignore[arg-type]
            "heldout_acc": round(fam.heldout_acc(fam.model), 4),  # type: ignore[arg-type]
            "memorises": name in MEMORISING,
            "recipe": fam.recipe.to_dict(),
            "train_seconds": round(fam.seconds_to_train, 3),
        }
        fams.append(fam)
    for label, with_recipe in (("approximate", False), ("escalation", True)):
        print(f"{label}:", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "storage").mkdir()
            settings = stack_settings(
                database_url=f"sqlite:///{work / 'lethe.db'}",
                storage_dir=work / "storage",
                home=work / "home",
                **production,
            )
            with api_stack(settings) as stack:
                executor = WorkerProcess.embedded(settings, work / "executor.log").start()
                try:
                    rows = [
                        r for fam in fams for r in run_family(fam, stack, with_recipe=with_recipe)
                    ]
                finally:
                    executor.stop()
        results["passes"][label] = {"counts": counts(rows), "requests": rows}
        print(f"  {label}: {counts(rows)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
