"""The README stays true to the code: every setting documented, the two commands up front."""

from __future__ import annotations

from pathlib import Path

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
