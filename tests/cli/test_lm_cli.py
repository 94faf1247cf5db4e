"""`lethe datasets upload` and `lethe models register` for a causal LM, against a real server:
the four files go up in one request and the version serves them back byte for byte."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
from typer.testing import CliRunner

from tests.engine.lm_fixture import train_fixture
from tests.lm.lm_files import lm_files

from .conftest import Server


def _lethe(server: Server, *args: str):
    from service.cli import app

    return CliRunner().invoke(app, list(args), env=server.env)


def test_register_a_causal_lm_with_the_cli(server: Server, tmp_path: Path) -> None:
    lm = lm_files(train_fixture(n_forget=2, n_retain=4, n_heldout=2, max_epochs=10))
    paths = {}
    for name, content in (
        ("model.safetensors", lm.weights),
        ("config.json", lm.config),
        ("tokenizer.json", lm.tokenizer),
        ("tokenizer_config.json", lm.tokenizer_config),
        ("eval.jsonl", lm.eval),
    ):
        paths[name] = tmp_path / name
        paths[name].write_bytes(content)
    uploaded = _lethe(
        server,
        "datasets",
        "upload",
        str(paths["eval.jsonl"]),
        "--name",
        "lm-eval-cli",
        "--role",
        "eval",
        "--json",
    )
    assert uploaded.exit_code == 0, uploaded.output
    dataset = json.loads(uploaded.output)
    assert dataset["kind"] == "text"  # from the .jsonl suffix
    registered = _lethe(
        server,
        "models",
        "register",
        "--name",
        "lm-cli",
        "--architecture",
        "causal_lm",
        "--weights",
        str(paths["model.safetensors"]),
        "--config",
        str(paths["config.json"]),
        "--tokenizer",
        str(paths["tokenizer.json"]),
        "--tokenizer-config",
        str(paths["tokenizer_config.json"]),
        "--eval-dataset",
        dataset["id"],
        "--json",
    )
    assert registered.exit_code == 0, registered.output
    model = json.loads(registered.output)
    version = model["active_version"]["id"]
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        got = httpx.get(f"{server.url}/v1/model-versions/{version}/files/{name}", headers=auth)
        assert got.status_code == 200 and got.content == paths[name].read_bytes(), name
    assert model["active_version"]["sha256"] == hashlib.sha256(lm.weights).hexdigest()
    # Without the LM files the server names what is missing (422), and the CLI exits non-zero.
    missing = _lethe(
        server,
        "models",
        "register",
        "--name",
        "lm-cli-2",
        "--architecture",
        "causal_lm",
        "--weights",
        str(paths["model.safetensors"]),
    )
    assert missing.exit_code != 0 and "config" in missing.output
