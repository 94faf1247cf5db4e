"""The LM engine on the memorisation fixture (tests/engine/lm_fixture.py): 20 forget, 100
retain (the member probe) and 40 held-out fictitious profiles; a 2-layer, width-96 Llama
trained until it recites every training record; the same recipe retrained on the retain
records only as the reference.

Runs: IMU and plain GA, each with the ascent loss (``ga``) and the bounded loss (``npo``), at
the defaults; the same with looser guards (10 % probe-recall drop, 25 % perplexity rise, 8
backtracks); IMU on LoRA adapters (rank 8, attention projections); and with the guards off.
Each row also says what the LM release policy (service/trust/lm_policy.py, default
thresholds) decides for it. The held-out set is used
whole by the controller's guard and by the metrics here (the service splits it in halves).

    PYTHONPATH=. .venv/bin/python -m bench.lm_fixture_runs [--out bench/results/lm_fixture.json]

Writes the JSON and a Markdown table next to it (lm_fixture.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.lm_smollm2_recipe import section as recipe_section
from service.settings import Settings
from service.trust.lm_policy import decide_lm
from service.trust.policy import effective_policy
from tests.engine.lm_fixture import Fixture, retrain_without_forget, train_fixture
from worker.imu.checks import loss_auc
from worker.imu.lm_unlearn import LMUnlearnConfig, unlearn_lm
from worker.imu.text_metrics import evaluate_lm

LOOSE = {"guard_max_drop": 0.1, "ppl_max_rise": 0.25, "max_backtracks": 8}
OFF = {"guard_max_drop": 1.0, "ppl_max_rise": 100.0}
RUNS: list[tuple[str, dict[str, Any]]] = [
    *[("defaults", {"method": m, "loss": loss}) for m in ("imu", "ga") for loss in ("npo", "ga")],
    *[
        ("loose guards", {"method": m, "loss": loss, **LOOSE})
        for m in ("imu", "ga")
        for loss in ("npo", "ga")
    ],
    ("LoRA r 8", {"method": "imu", "loss": "npo", "lora_rank": 8}),
    ("LoRA r 8, loose guards", {"method": "imu", "loss": "npo", "lora_rank": 8, **LOOSE}),
    *[("guards off", {"method": "imu", "loss": loss, **OFF}) for loss in ("npo", "ga")],
]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lm_fixture.json"


def _metrics(fx: Fixture, model: torch.nn.Module) -> dict[str, Any]:
    ev = evaluate_lm(model, fx.forget, fx.heldout, fx.retain)
    ev["attacks"]["auc_limit"] = loss_auc(
        torch.zeros(len(fx.forget)), torch.zeros(len(fx.heldout))
    )[1]
    return ev


def _row(ev: dict[str, Any]) -> dict[str, Any]:
    return {
        "forget_recall": round(ev["forget"]["exact_recall"], 4),
        "retain_recall": round(ev["member_probe"]["exact_recall"], 4),
        "heldout_ppl": round(ev["heldout"]["perplexity"], 3),
        "forget_nll": round(ev["forget"]["nll"], 4),
        "heldout_nll": round(ev["heldout"]["nll"], 4),
        "min_k_auc": round(ev["attacks"]["min_k_auc"], 4),
        "loss_auc": round(ev["attacks"]["loss_auc"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fx = train_fixture(n_forget=20, n_retain=100, n_heldout=40)
    start = time.process_time()
    reference = retrain_without_forget(fx)
    retrain_s = time.process_time() - start
    before = _metrics(fx, fx.model)
    policy = effective_policy(Settings(), None)
    rows: list[dict[str, Any]] = [
        {
            "run": "before",
            "train_cpu_s": round(fx.train_seconds, 1),
            "epochs": fx.epochs,
            **_row(before),
        },
        {
            "run": "retrained without the forget set",
            "train_cpu_s": round(retrain_s, 1),
            "policy": decide_lm(policy, before, _metrics(fx, reference))["decision"],
            **_row(_metrics(fx, reference)),
        },
    ]
    print(json.dumps(rows[0]), json.dumps(rows[1]), sep="\n", flush=True)
    for label, kw in RUNS:
        model = copy.deepcopy(fx.model)
        start = time.process_time()
        res = unlearn_lm(model, fx.forget, fx.heldout, fx.retain, LMUnlearnConfig(**kw))
        cpu = time.process_time() - start
        cal = res.stats["calibration"]
        after = _metrics(fx, model)
        verdict = decide_lm(policy, before, after)
        rows.append(
            {
                "run": label,
                "params": kw,
                "reason": cal["reason"],
                "steps": cal["steps"],
                "backtracks": cal["backtracks"],
                "cpu_s": round(cpu, 1),
                "peak_rss_mib": round(res.stats["peak_rss_mib"]),
                "policy": verdict["decision"],
                "failed": verdict["failed"],
                **_row(after),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "fixture": {
            "n_forget": len(fx.forget),
            "n_retain": len(fx.retain),
            "n_heldout": len(fx.heldout),
            "config": fx.config,
            "torch_threads": 1,
        },
        "policy_thresholds": {
            k: policy[k]
            for k in (
                "max_forget_recall",
                "max_heldout_ppl_rise",
                "max_probe_recall_drop",
                "max_forget_auc_excess",
            )
        },
        "rows": rows,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(rows))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | method | loss | forget recall | retain recall | held-out ppl | min-k AUC | "
        "forget NLL | stop | steps | CPU-s | policy |\n|" + "---|" * 12 + "\n"
    )
    lines = []
    for r in rows:
        p = r.get("params", {})
        lines.append(
            f"| {r['run']} | {p.get('method', '')} | {p.get('loss', '')} | {r['forget_recall']} | "
            f"{r['retain_recall']} | {r['heldout_ppl']} | {r['min_k_auc']} | {r['forget_nll']} | "
            f"{r.get('reason', '')} | {r.get('steps', '')} | "
            f"{r.get('cpu_s', r.get('train_cpu_s', ''))} | {r.get('policy', '')} |"
        )
    return head + "\n".join(lines) + "\n"


def section(path: Path) -> str:
    """The RESULTS.md section of a lm_fixture.json ('' when there is none)."""
    if not path.exists():
        return ""
    doc = json.loads(path.read_text())
    fx, rows = doc["fixture"], doc["rows"]
    kept = [r for r in rows[2:] if r["retain_recall"] >= 0.9 * rows[0]["retain_recall"]]
    best = min((r["forget_recall"] for r in kept), default=None)
    reached = best is not None and best <= 0.05
    off = [r["heldout_ppl"] / rows[0]["heldout_ppl"] for r in rows if r["run"] == "guards off"]
    damage = f"×{min(off):.0f}–{max(off):.0f}" if off else "many-fold"
    return (
        "## Language models: the memorisation fixture\n\n"
        f"A {fx['config']['num_hidden_layers']}-layer, width-{fx['config']['hidden_size']} "
        f"Llama trained until it recites {fx['n_forget']} forget and {fx['n_retain']} retain "
        f"fictitious profiles; {fx['n_heldout']} held-out profiles; CPU, one thread "
        "(`python -m bench.lm_fixture_runs`). Recall = greedy exact completion; retain recall "
        "is the member probe; policy = the LM release policy at its default thresholds.\n\n"
        + table(rows)
        + "\nGoal: forget recall ≤ 0.05 with retain recall ≥ 0.9 of its value before. "
        + ("**Reached**" if reached else "**Not reached**")
        + f": the lowest forget recall among runs that kept ≥ 90 % of retain recall is {best}. "
        "Retain-free ascent is not selective on look-alike records: with the guards on it stops "
        "(guard-exhausted) with most forget records still recited, and the policy holds the "
        "result as a candidate; with the guards off it reaches zero forget recall only by "
        f"destroying the model (held-out perplexity {damage}, retain recall 0), which the policy "
        "also refuses. The retrained reference passes every check.\n"
        + smollm2_section(path.with_name("lm_smollm2.json"))
        + recipe_section(path.with_name("lm_smollm2_recipe.json"))
    )


def smollm2_section(path: Path) -> str:
    """The paragraph on the real pretrained model (bench/lm_smollm2.py), if it was run."""
    if not path.exists():
        return ""
    r = json.loads(path.read_text())
    b, a, t = r["before"], r["after"], r["timings"]
    return (
        f"\nA real pretrained model (`python -m bench.lm_smollm2`): {r['model']}, "
        f"{r['parameters'] / 1e6:.1f} M parameters, a {r['checkpoint_bytes'] / 2**20:.0f} MiB "
        f"checkpoint registered through the API (in-process) in {r['register_s']} s "
        "(checked on the meta device). "
        f"A request for {r['n']['forget']} facts with θ = attention of the last three layers and "
        f"{r['params']['max_steps']} steps at most: job {r['outcome']} in {r['job_wall_s']} s "
        f"(loading {t['loading']:.1f}, influence {t['influence']:.1f}, unlearning "
        f"{t['unlearning']:.1f}, evaluating {t['evaluating']:.1f}, saving {t['saving']:.1f} s), "
        f"peak RSS {r['peak_rss_mib']} MiB; stop: {r['calibration']['reason']}; forget recall "
        f"{b['forget']['exact_recall']} → {a['forget']['exact_recall']}, held-out perplexity "
        f"{b['heldout']['perplexity']} → {a['heldout']['perplexity']}; policy: "
        f"{r['policy']['decision']} (failed: {', '.join(r['policy']['failed']) or 'none'}). "
        "The path works on a real model within a CPU budget; it does not forget these facts.\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
