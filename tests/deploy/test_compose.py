"""The production stack files, checked by parsing (no Docker engine runs on the test machines)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|HMAC|API_KEY|_KEY$)", re.IGNORECASE)
# ${VAR}, ${VAR:?message} or ${VAR?message}: a value supplied from outside, no default.
INTERPOLATED_NO_DEFAULT = re.compile(r"^\$\{[A-Z0-9_]+(:?\?[^}]*)?\}$")
URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_stack_has_every_service(services: dict[str, Any]) -> None:
    assert set(services) >= {"postgres", "redis", "migrate", "api", "worker"}


def test_datastores_have_volumes_and_healthchecks(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    pg = services["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    redis = services["redis"]
    assert "ping" in redis["healthcheck"]["test"]
    named = set(compose["volumes"])
    for svc in ("postgres", "redis"):
        for volume in services[svc]["volumes"]:
            assert volume.split(":", 1)[0] in named, f"{svc} volume {volume} is not a named volume"


def test_migrate_is_one_shot_after_healthy_postgres(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate.get("restart") == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_processes_wait_for_migration_and_datastores(services: dict[str, Any], name: str) -> None:
    deps = services[name]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["postgres"]["condition"] == "service_healthy"


def test_api_probes_healthz_and_publishes_its_port(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["command"][0] == "serve"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert any(str(p).endswith(":8000") for p in api["ports"])


def test_worker_reserves_a_gpu(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert worker["command"] == ["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "cuda" in _env(worker)["LETHE_DEVICE"]
    # Its liveness is a Celery ping (the image's default probe is the API's /healthz).
    probe = " ".join(worker["healthcheck"]["test"])
    assert "inspect ping" in probe and "worker.celery_app" in probe


def test_api_and_worker_share_storage_and_production_settings(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    api_vols = set(services["api"]["volumes"])
    worker_vols = set(services["worker"]["volumes"])
    shared = api_vols & worker_vols
    assert shared and all(v.split(":", 1)[0] in compose["volumes"] for v in shared)
    for name in ("migrate", "api", "worker"):
        env = _env(services[name])
        assert env["LETHE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["LETHE_DATABASE_URL"]
        assert env["LETHE_BROKER_URL"].startswith("redis://redis:")
        assert env["LETHE_STORAGE_URL"]
        env_files = services[name]["env_file"]
        assert any((e["path"] if isinstance(e, dict) else e) == ".env" for e in env_files)


def test_no_secret_is_hard_coded(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for var, value in _env(service).items():
            if SECRET_NAME.search(var):
                assert INTERPOLATED_NO_DEFAULT.match(value), (
                    f"{name}.{var} must come from the environment without a default, got {value!r}"
                )
            for password in URL_PASSWORD.findall(value):
                assert INTERPOLATED_NO_DEFAULT.match(password), (
                    f"{name}.{var} embeds a literal password"
                )


def test_env_example_lists_required_variables_with_empty_secrets() -> None:
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assignments = dict(
        line.split("=", 1)
        for line in example.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    compose_text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", compose_text))
    assert required, "the compose file should require its secrets"
    assert required <= set(assignments), f"missing from .env.example: {required - set(assignments)}"
    for var, value in assignments.items():
        if SECRET_NAME.search(var):
            assert value == "", f".env.example must not carry a value for {var}"


def test_dockerfile_is_multistage_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    assert re.search(r"^COPY\s+--from=", text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "the image must switch to an unprivileged user"
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    user = re.sub(
        r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), users[-1].split(":")[0]
    )
    assert user not in {"root", "0"} and "$" not in user, f"runtime user resolves to {user!r}"
    health = re.search(r"^HEALTHCHECK\b((?:.*\\\n)*.*)", text, re.MULTILINE)
    assert health and "/healthz" in health.group(1)
    assert re.search(r'^ENTRYPOINT\s+\["lethe"\]', text, re.MULTILINE)
    # CUDA torch by default, CPU variant through a build argument.
    assert re.search(r"^ARG\s+TORCH_INDEX=", text, re.MULTILINE)
    assert re.search(r"^ARG\s+TORCH_SPEC=torch==", text, re.MULTILINE)


def test_dockerignore_keeps_state_and_secrets_out() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".lethe", ".env"} <= ignored


def _dockerfile_runs() -> list[str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return re.findall(r"^RUN\s+(.*)$", text, re.MULTILINE)


def _shell(command: str, extras: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a RUN line as the build would (sh, ARGs as variables); pip only prints its
    arguments, and `python` is this interpreter."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S*)", text, re.MULTILINE))
    env = {k: v.strip('"') for k, v in args.items()}
    env["LETHE_EXTRAS"] = extras
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    script = 'pip() { printf "%s\\n" "$@"; }\n' + command
    return subprocess.run(
        ["sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("extras", "target", "torchvision"),
    [("", ".", False), ("s3,lm", ".[s3,lm]", False), ("vision", ".[vision]", True)],
)
def test_dockerfile_installs_the_named_extras_through_the_lock(
    extras: str, target: str, torchvision: bool, tmp_path: Path
) -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    build = text.split("FROM", 2)[1]  # the build stage declares the argument
    assert re.search(r'^ARG\s+LETHE_EXTRAS=""$', build, re.MULTILINE)
    assert re.search(r"^COPY\s+.*\brequirements\.lock\b", build, re.MULTILINE)
    runs = _dockerfile_runs()
    check = next(r for r in runs if "optional-dependencies" in r)
    torch = next(r for r in runs if "TORCH_INDEX" in r)
    lethe = next(r for r in runs if "-c requirements.lock" in r)
    assert _shell(check, extras, tmp_path).returncode == 0
    torch_args = _shell(torch, extras, tmp_path).stdout.split()
    assert ("torchvision==0.28.0" in torch_args) is torchvision
    assert "torch==2.13.0" in torch_args
    install = _shell(lethe.split("&&")[0], extras, tmp_path).stdout.split()
    assert install == ["install", "-c", "requirements.lock", target]


def test_dockerfile_refuses_an_unknown_extra(tmp_path: Path) -> None:
    check = next(r for r in _dockerfile_runs() if "optional-dependencies" in r)
    done = _shell(check, "s3,nope", tmp_path)
    assert done.returncode != 0 and "nope" in done.stderr
