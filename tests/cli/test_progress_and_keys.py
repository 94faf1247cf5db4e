"""The per-phase progress display and the keys-file reader, without a server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import typer
from rich.console import Console

from service.cli.client_commands import read_keys_file
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


def test_an_escalated_job_shows_its_retraining_epochs() -> None:
    console = Console(file=io.StringIO(), width=160)
    asked: list[str] = []

    def epochs(model: str) -> int:
        asked.append(model)
        return 30

    with JobProgress(console, title="request r1", recipe_epochs=epochs) as bars:
        task = bars.progress.tasks[bars._retrain_task]  # type: ignore[index]
        bars.update({"status": "running", "phase": "unlearning", "progress": 0.5, "model": "m"})
        assert not task.visible  # hidden unless the job retrains
        job = {"status": "running", "phase": "retraining", "progress": 0.5, "model": "m"}
        bars.update(job)
        bars.update({**job, "progress": 0.6})
        assert task.visible and task.completed == 60 and task.fields["note"] == "epoch 19/30"
        assert asked == ["m"]  # the recipe is asked once
        bars.update(
            {
                "status": "succeeded",
                "phase": "saving",
                "progress": 1.0,
                "model": "m",
                "timings": {"retraining": 2.5},
            }
        )
        assert task.completed == 100 and task.fields["note"] == "2.50s"
    text = console.file.getvalue()
    assert "escalating to exact forgetting" in text and "retraining" in text


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
