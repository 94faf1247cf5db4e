from pathlib import Path

import pytest

from service.settings import SettingsError, load_settings


def test_defaults_live_under_home(lethe_env: Path) -> None:
    s = load_settings()
    assert s.home == lethe_env
    assert s.db_url == f"sqlite:///{(lethe_env / 'lethe.db').resolve()}"
    assert s.storage == str((lethe_env / "storage").resolve())
    assert s.embedded is True
    assert s.device == "auto"
    assert s.max_upload_mb == 2048
    assert s.max_attempts == 3


def test_environment_overrides(lethe_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("LETHE_BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("LETHE_DEVICE", "cuda:1")
    monkeypatch.setenv("LETHE_MAX_UPLOAD_MB", "5")
    s = load_settings()
    assert s.db_url == "postgresql+psycopg://u@h/db"
    assert s.embedded is False
    assert s.device == "cuda:1"
    assert s.max_upload_bytes == 5 * 1024 * 1024


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("LETHE_DEVICE", "gpu0"),
        ("LETHE_MAX_UPLOAD_MB", "-1"),
        ("LETHE_MAX_UPLOAD_MB", "lots"),
        ("LETHE_DATABASE_URL", "mysql://x/y"),
        ("LETHE_BROKER_URL", "kafka://x"),
    ],
)
def test_bad_value_names_the_variable(
    lethe_env: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings()


def test_time_limits_must_be_ordered(lethe_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_JOB_SOFT_TIME_LIMIT_S", "100")
    monkeypatch.setenv("LETHE_JOB_HARD_TIME_LIMIT_S", "50")
    with pytest.raises(SettingsError, match="LETHE_JOB_HARD_TIME_LIMIT_S"):
        load_settings()


@pytest.mark.parametrize("var", ["LETHE_SUPERSEDED_RETENTION_S", "LETHE_SUPERSEDED_RETENTION"])
def test_retention_accepts_both_spellings(
    lethe_env: Path, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    monkeypatch.setenv(var, "90")
    assert load_settings().superseded_retention_s == 90.0
    monkeypatch.setenv(var, "-5")
    with pytest.raises(SettingsError, match=f"(?<!LETHE_){var}"):
        load_settings()


def test_fields_can_be_passed_by_name(lethe_env: Path) -> None:
    assert load_settings(superseded_retention_s=7).superseded_retention_s == 7.0
