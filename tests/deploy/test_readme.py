"""The README stays true to the code: every setting documented, the two commands up front."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.devtools.localserver import free_port
from service.settings import ENV_PREFIX, Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_configuration_table() -> None:
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {
        line.split("|")[1].strip().strip("`")
        for line in table.splitlines()
        if line.startswith("| `")
    }
    expected = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert expected - rows == set(), f"undocumented settings: {sorted(expected - rows)}"
    assert rows - expected == set(), f"documented but unknown: {sorted(rows - expected)}"


def test_first_screen_has_exactly_the_two_commands() -> None:
    first_screen = README.split("\n---", 1)[0]
    assert "make demo" in first_screen and "make test" in first_screen
    commands = [
        ln.split("#")[0].strip()
        for ln in first_screen.split("```bash", 1)[1].split("```", 1)[0].splitlines()
        if ln.strip()
    ]
    assert commands == ["make demo", "make test"]


def walkthrough_blocks() -> list[str]:
    """The walkthrough's shell sessions: each starts its own server in a fresh home."""
    section = README.split("<!-- section: walkthrough -->", 1)[1].split("<!-- section:", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```bash\n")[1:]]
    return [b for b in blocks if "lethe serve" in b]


def test_walkthrough_blocks_start_fresh_and_assume_no_checkout() -> None:
    blocks = walkthrough_blocks()
    assert len(blocks) == 2
    for block in blocks:
        assert block.startswith("export LETHE_HOME=$(mktemp -d)")
        assert ".venv" not in block and "source " not in block
        # Stopped at the end (a pasted block must free the port for the next one), and by
        # the trap when a script stops early.
        assert "trap 'kill $SERVER 2> /dev/null || true' EXIT" in block
        assert block.rstrip().splitlines()[-1].startswith("kill $SERVER; wait $SERVER")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["curl", "cli"])
def test_walkthrough_block_runs_as_written(which: str, tmp_path: Path) -> None:
    """Run from an unrelated directory, with only the installed `lethe` and its Python on
    PATH (no activated checkout), on a free port."""
    block = walkthrough_blocks()[0 if which == "curl" else 1]
    if shutil.which("curl") is None or shutil.which("jq") is None:
        pytest.skip("needs curl and jq")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PORT=str(free_port()),
        TMPDIR=str(tmp_path),
        OMP_NUM_THREADS="1",
        LETHE_EMBEDDED_POLL_SECONDS="0.2",
    )
    run = subprocess.run(
        ["bash", "-e", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    if which == "curl":
        assert '{"number":1,"status":"active"}' in run.stdout, output[-4000:]
        assert '"status":"completed","version":{"number":2,"status":"active"}' in run.stdout
        assert '"forgetting":"exact"' in run.stdout  # IMU held, escalated to the recipe
        assert '{"count":3}' in run.stdout and '"ok":true' in run.stdout
    else:
        assert "completed" in run.stdout and "needs_review" in run.stdout, output[-4000:]
        assert "OK: receipt for deletion request" in run.stdout
        # `forget --wait` states how each request was answered and on what evidence.
        assert re.search(r"membership evidence: \S+ \(n = \d+, Z = ", run.stdout), output[-4000:]
        assert "attempt 1: imu" in run.stdout and "false-release rate" in run.stdout
        assert "release policy: candidate" in run.stdout  # the held request's policy table
        assert "audit chain intact" in run.stdout
    assert "Traceback" not in output, output[-4000:]
