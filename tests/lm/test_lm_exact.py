"""Exact forgetting for a causal LM: a model registered with the base it was fine-tuned from
and its fine-tuning recipe is fine-tuned again from the base without the records when
approximate forgetting is held (escalation, the default), or when a request asks for
`method: "retrain"`. Real API (TestClient), SQLite, the production release policy and a real
worker process (`python -m worker.embedded`, what `lethe serve` runs); the tiny Llama of
tests/lm/finetuned.py, fine-tuned in this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lm.finetuned import RECIPE, FineTuned, build
from tests.lm.lm_files import jsonl
from tests.trust.conftest import PRODUCTION_POLICY, get, post, request_id_of
from tests.worker.harness import Stack, WorkerProcess, api_stack, poll, stack_settings, wait_until


@pytest.fixture(scope="module")
def tuned() -> FineTuned:
    return build()


@pytest.fixture
def lm_stack(lethe_env: Path, sqlite_url: str, storage_dir: Path) -> Iterator[Stack]:
    settings = stack_settings(database_url=sqlite_url, storage_dir=storage_dir, **PRODUCTION_POLICY)
    with api_stack(settings) as stack:
        yield stack


@pytest.fixture
def worker(lm_stack: Stack, tmp_path: Path) -> Iterator[WorkerProcess]:
    proc = WorkerProcess.embedded(lm_stack.settings, tmp_path / "worker.log").start()
    try:
        yield proc
    finally:
        proc.stop()


def _upload(stack: Stack, name: str, role: str, content: bytes) -> str:
    resp = post(
        stack,
        "/v1/datasets",
        data={"name": name, "kind": "text", "role": role},
        files={"file": (f"{name}.jsonl", content, "application/x-ndjson")},
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _register(stack: Stack, spec: dict[str, Any], files: dict[str, Any]) -> Any:
    return post(stack, "/v1/models", data={"spec": json.dumps(spec)}, files=files)


def register_base(stack: Stack, tuned: FineTuned) -> str:
    """The base as a model of its own; the id of its version 1."""
    resp = _register(
        stack, {"name": "tiny-base", "architecture": "causal_lm"}, tuned.form_files(tuned.base)
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["active_version"]["id"])


def register_tuned(stack: Stack, tuned: FineTuned, name: str, **recipe: Any) -> str:
    base = register_base(stack, tuned)
    ids = {
        "train": _upload(stack, f"{name}-train", "train", tuned.train_jsonl),
        "eval": _upload(stack, f"{name}-eval", "eval", jsonl(tuned.examples["heldout"])),
        "probe": _upload(stack, f"{name}-probe", "member_probe", jsonl(tuned.examples["retain"])),
    }
    spec = {
        "name": name,
        "architecture": "causal_lm",
        "eval_dataset": ids["eval"],
        "member_probe_dataset": ids["probe"],
        "recipe": {**RECIPE, **recipe, "base_version": base, "datasets": [ids["train"]]},
    }
    resp = _register(stack, spec, tuned.form_files(tuned.model))
    assert resp.status_code == 201, resp.text
    stack.models[name] = ids["train"]
    return name


def _request(stack: Stack, job: str) -> dict[str, Any]:
    return dict(get(stack, f"/v1/deletion-requests/{request_id_of(stack, job)}").json())


@pytest.mark.slow
def test_a_default_request_escalates_to_an_exact_refinetune(
    lm_stack: Stack, worker: WorkerProcess, tuned: FineTuned
) -> None:
    stack = lm_stack
    model = register_tuned(stack, tuned, "profiles")
    shown = get(stack, f"/v1/models/{model}").json()
    recipe = shown["recipe"]
    assert recipe["epochs"] == RECIPE["epochs"] and recipe["method"] == "full"
    assert len(recipe["base_sha256"]) == 64 and len(shown["recipe_sha256"]) == 64
    keys = tuned.forget_keys  # 4 profiles the model recites
    job = stack.submit(model, keys)  # no method, no params: IMU first
    done = stack.wait([job], timeout=600)[job]
    assert done["status"] == "succeeded", worker.log_text()[-3000:]
    request = _request(stack, job)
    why = json.dumps([request["attempts"], request["policy"]["checks"]])
    assert request["status"] == "completed", why
    assert request["forgetting"] == "exact"
    methods = [(a["method"], a["outcome"]) for a in request["attempts"]]
    assert methods == [("imu", "held"), ("retrain", "released")], request["attempts"]
    assert {"unlearning", "retraining"} <= set(done["timings"])
    before, after = done["metrics"]["before"], done["metrics"]["after"]
    assert before["forget"]["exact_recall"] == 1.0  # the fine-tune memorised them
    assert after["forget"]["exact_recall"] <= 0.05
    assert after["member_probe"]["exact_recall"] >= 0.9 * before["member_probe"]["exact_recall"]
    stats = done["metrics"]["influence"]
    assert stats["n_train"] == len(tuned.examples["retain"]) and stats["finetune"] == "full"
    assert stats["escalated_from"]["method"] == "imu"
    # The receipt says exact and cites the recipe.
    receipt = poll(
        lambda: (
            (r := get(stack, f"/v1/deletion-requests/{request['id']}/receipt")).status_code == 200
            and r.json()
        ),
        timeout=30,
    )
    claim = receipt["payload"]["forgetting"]
    assert claim["kind"] == "exact" and claim["recipe_sha256"] == shown["recipe_sha256"]
    assert claim["attempts"] == ["imu", "retrain"]
    # The released weights are the base fine-tuned by the recipe without the records.
    from safetensors.torch import load as st_load

    from worker.imu.language_models import load_causal_lm

    version = request["result_version"]
    data = get(stack, f"/v1/model-versions/{version['id']}/checkpoint").content
    released = load_causal_lm(tuned.config, st_load(data))
    reference = tuned.refinetune(keys)
    ids = tuned.batch(tuned.examples["forget"] + tuned.examples["heldout"][:4]).ids
    with torch.no_grad():
        ours, theirs = released(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-3), float((ours - theirs).abs().max())
    states = stack.record_states(stack.models[model], keys)
    assert set(states.values()) == {"forgotten"}


@pytest.mark.slow
def test_a_refinetune_is_cancelled_mid_epoch(
    lm_stack: Stack, worker: WorkerProcess, tuned: FineTuned
) -> None:
    stack = lm_stack
    model = register_tuned(stack, tuned, "long", epochs=5000, batch_size=32)
    job = stack.submit(model, tuned.forget_keys[:2], method="retrain")
    wait_until(
        lambda: (row := stack.job_rows([job])[job]).phase == "retraining" and row.progress > 0,
        timeout=120,
        what="re-fine-tune under way",
    )
    assert stack.cancel(job).status_code in (200, 202)
    done = stack.wait([job], timeout=60)[job]
    assert done["status"] == "cancelled", worker.log_text()[-3000:]
    # An epoch is two steps at batch 32: the cancel landed long before the 5000 epochs.
    assert done["progress"] < 0.5
    assert [v["number"] for v in stack.versions(model)] == [1]


BAD = [
    ({"epochs": 0}, "spec.recipe.epochs"),
    ({"lr": -1.0}, "spec.recipe.lr"),
    ({"method": "qlora"}, "spec.recipe.method"),
    ({"warmup_steps": 10}, "spec.recipe.warmup_steps"),
    ({"max_length": 4096}, "spec.recipe.max_length"),
    ({"lora_r": 8}, "spec.recipe.lora_r"),  # LoRA settings without method lora
    ({"method": "lora", "lora_targets": ["no_such_proj"]}, "spec.recipe.lora_targets.0"),
    ({"base_version": "no-such-version"}, "spec.recipe.base_version"),
    ({"datasets": ["EVAL"]}, "spec.recipe.datasets.0"),
    ({"other_tokenizer": True}, "spec.recipe.base_version"),
]


@pytest.mark.parametrize(("change", "field"), BAD)
def test_a_bad_lm_recipe_is_refused_naming_the_field(
    lm_stack: Stack, tuned: FineTuned, change: dict[str, Any], field: str
) -> None:
    stack = lm_stack
    change = dict(change)
    files = tuned.form_files(tuned.model)
    if change.pop("other_tokenizer", False):  # the base speaks another tokenizer
        from tests.engine.lm_fixture import train_tokenizer

        other = train_tokenizer(["something else entirely"] * 4, vocab_size=300)
        resp = _register(
            stack,
            {"name": "other-base", "architecture": "causal_lm"},
            tuned.form_files(tuned.base, other.to_str().encode()),
        )
        assert resp.status_code == 201, resp.text
        base = resp.json()["active_version"]["id"]
    else:
        base = register_base(stack, tuned)
    train = _upload(stack, "t", "train", tuned.train_jsonl)
    evals = _upload(stack, "e", "eval", jsonl(tuned.examples["heldout"]))
    recipe = {**RECIPE, "base_version": base, "datasets": [train], **change}
    recipe["datasets"] = [evals if d == "EVAL" else d for d in recipe["datasets"]]
    resp = _register(stack, {"name": "bad", "architecture": "causal_lm", "recipe": recipe}, files)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in resp.json()["errors"]] == [field], resp.json()
    assert get(stack, "/v1/models/bad").status_code == 404


def test_the_recipes_and_the_retraining_phase_are_in_the_openapi_document(
    lm_stack: Stack,
) -> None:
    schema = get(lm_stack, "/openapi.json").json()["components"]["schemas"]
    lm = schema["LMTrainingRecipe"]
    assert {"base_version", "epochs", "lr", "datasets"} <= set(lm["required"])
    assert lm["properties"]["method"]["enum"] == ["full", "lora"]
    assert "init_seed" in schema["TrainingRecipe"]["properties"]
    assert "retraining" in json.dumps(schema["JobOut"]["properties"]["phase"]) + json.dumps(
        schema.get("Phase", {})
    )
