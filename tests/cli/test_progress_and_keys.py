"""The per-phase progress display and the keys-file reader, without a server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import typer
from rich.console import Console

from service.cli.client import read_keys_file
from service.cli.progress import PHASES, JobProgress


def _completed(bars: JobProgress) -> dict[str, float]:
    return {name: bars.progress.tasks[task].completed for name, task in bars._tasks.items()}


def test_bars_follow_phases_and_complete_skipped_ones() -> None:
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    with JobProgress(console, title="job") as bars:
        bars.update({"status": "queued", "phase": None, "progress": 0})
        assert set(_completed(bars).values()) == {0}
        bars.update({"status": "running", "phase": "loading", "progress": 0.5})
        assert _completed(bars)["loading"] == 50
        # A poll can miss whole phases: everything before the current one is done.
        bars.update(
            {
                "status": "running",
                "phase": "evaluating",
                "progress": 0.3,
                "timings": {"loading": 1.25, "unlearning": 0.5},
            }
        )
        done = _completed(bars)
        assert [done[p] for p in PHASES] == [100, 100, 100, 30, 0]
        assert bars.progress.tasks[bars._tasks["loading"]].fields["note"] == "1.25s"
        bars.update({"status": "succeeded", "phase": "saving", "progress": 1.0})
        assert set(_completed(bars).values()) == {100}
    assert "succeeded" in console.file.getvalue()


def test_a_failed_phase_is_marked_and_later_ones_stay_empty() -> None:
    console = Console(file=io.StringIO(), width=120)
    with JobProgress(console) as bars:
        bars.update({"status": "running", "phase": "influence", "progress": 0.2})
        bars.update({"status": "failed", "phase": "influence", "progress": 0.2})
        done = _completed(bars)
        assert done["loading"] == 100 and done["influence"] == 20 and done["saving"] == 0
        assert "failed" in bars.progress.tasks[bars._tasks["influence"]].fields["note"]


def test_keys_file_formats(tmp_path: Path) -> None:
    lines = tmp_path / "keys.txt"
    lines.write_text("# header\nalice-1\n\n  bob-2  \n# trailing\n")
    assert read_keys_file(lines) == ["alice-1", "bob-2"]
    array = tmp_path / "keys.json"
    array.write_text('["a", "b c", "#not-a-comment"]')
    assert read_keys_file(array) == ["a", "b c", "#not-a-comment"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(typer.BadParameter):
        read_keys_file(bad)
