"""The text path end to end on the embedded defaults (SQLite, no broker, local storage, a
worker process), in well under a minute on a CPU:

    PYTHONPATH=. .venv/bin/python -m bench.lm_demo [--home DIR]

1. trains a tiny Llama to recite fictitious profiles (tests/engine/lm_fixture.py);
2. starts `lethe serve` on a free port, uploads the profiles as JSONL (train, eval,
   member_probe) and registers the model (`causal_lm`: weights + config + tokenizer files);
3. asks it to forget five memorised profiles with default params, polls the job and prints
   the release policy's checks (on this model the result is held as a candidate: see the
   README, "Language models");
4. asks it to forget profiles the model never learned (nothing to undo: released);
5. downloads the candidate version, reloads it with transformers and shows which of the
   five profiles it still recites.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from service.devtools.localserver import LocalService
from tests.engine.lm_fixture import profiles, train_fixture
from tests.lm.lm_files import jsonl, lm_files, spec


def _wait(c: httpx.Client, job_id: str) -> dict[str, Any]:
    last = None
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        now = (job["status"], job.get("phase"))
        if now != last:
            print(f"   job {job_id[:8]}: {job['status']} {job.get('phase') or ''}", flush=True)
            last = now
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.3)


def _complete(model: torch.nn.Module, tokenizer: Any, prompt: str, n: int = 40) -> str:
    ids = torch.tensor([[1, *tokenizer.encode(prompt).ids]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return str(tokenizer.decode(out[0, ids.shape[1] :].tolist()))


def _report(job: dict[str, Any]) -> None:
    policy = job["metrics"]["policy"]
    print(f"   decision: {policy['decision']}")
    for check in policy["checks"]:
        print(
            f"     {check['name']:<26} value {check['value']} limit {check['limit']} "
            f"{'ok' if check['ok'] else 'FAILED'}"
        )


def run(home: Path) -> None:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    print("1. training a tiny Llama on 80 fictitious profiles ...", flush=True)
    files = lm_files(train_fixture())
    fx = files.fixture
    service = LocalService(
        home,
        env={
            "OMP_NUM_THREADS": "1",
            "LETHE_TORCH_THREADS": "1",
            "LETHE_EMBEDDED_POLL_SECONDS": "0.2",
        },
    )
    print(f"2. lethe serve at {service.url} (home {home})", flush=True)
    with service:
        key = service.create_key("admin", "lm-demo")
        with httpx.Client(
            base_url=service.url, timeout=60, headers={"Authorization": f"Bearer {key}"}
        ) as c:
            unseen = profiles(5, seed=4242, prefix="new")
            ids = {}
            for role, content in (
                ("train", files.train + jsonl(unseen)),
                ("eval", files.eval),
                ("member_probe", files.probe),
            ):
                resp = c.post(
                    "/v1/datasets",
                    data={"name": f"profiles-{role}", "kind": "text", "role": role},
                    files={"file": ("p.jsonl", content, "application/x-ndjson")},
                )
                resp.raise_for_status()
                ids[role] = resp.json()["id"]
            resp = c.post(
                "/v1/models",
                files=files.form_files(),
                data={
                    "spec": spec(
                        "profiles-lm",
                        eval_dataset=ids["eval"],
                        member_probe_dataset=ids["member_probe"],
                    )
                },
            )
            resp.raise_for_status()
            keys = files.forget_keys[:5]
            print(f"3. forget {keys} (default params)", flush=True)
            body = {"model": "profiles-lm", "dataset": ids["train"], "record_keys": keys}
            job = _wait(c, c.post("/v1/deletion-requests", json=body).json()["job"]["id"])
            _report(job)
            candidate = job["result_version_id"]
            print("4. forget 5 profiles the model never learned", flush=True)
            body["record_keys"] = [e.key for e in unseen]
            job2 = _wait(c, c.post("/v1/deletion-requests", json=body).json()["job"]["id"])
            _report(job2)
            print("5. download the version of step 3 and reload it with transformers", flush=True)
            where = home / "v2"
            where.mkdir(exist_ok=True)
            (where / "model.safetensors").write_bytes(
                c.get(f"/v1/model-versions/{candidate}/checkpoint").content
            )
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                got = c.get(f"/v1/model-versions/{candidate}/files/{name}")
                (where / name).write_bytes(got.content)
            model = AutoModelForCausalLM.from_pretrained(where).eval()
            for example in fx.examples["forget"][:5]:
                prompt, want = example.prompt or "", (example.completion or "").strip()
                got = _complete(model, fx.tokenizer, prompt).strip()
                verdict = "still recited" if got.startswith(want) else "forgotten"
                print(f"   {prompt!r}: {verdict}; the version says {got[:70]!r}")
    print(f"done in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Lethe's text path end to end.")
    parser.add_argument("--home", type=Path, default=None, help="LETHE_HOME (default: temp)")
    args = parser.parse_args(argv)
    if args.home is not None:
        run(args.home.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="lethe-lm-demo-") as tmp:
            run(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
