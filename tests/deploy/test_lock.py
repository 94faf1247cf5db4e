"""requirements.lock (`make lock`): every dependency pyproject.toml names, in every extra, has
an exact pin that meets pyproject's lower bound, and this venv runs exactly those versions;
`make install`, the Dockerfile and CI install through it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# Installed first from the index that matches the hardware (CPU or CUDA), never locked.
TORCH_FAMILY = {"torch", "torchvision"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{name} pinned twice"
        pins[name] = match.group(2)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return [Requirement(r) for r in requirements]


def test_every_declared_dependency_is_pinned_within_its_bounds() -> None:
    pins = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        if name in TORCH_FAMILY:
            assert name not in pins, f"{name} is installed from the torch index, not the lock"
            continue
        assert name in pins, f"{req} (pyproject.toml) has no pin in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {req}"
        )
    assert not any(n.startswith("nvidia-") or n == "triton" for n in pins)
    assert "lethe-unlearning" not in pins  # the project itself is installed editable


def test_installed_versions_match_the_lock() -> None:
    wrong = {}
    for name, version in _lock().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"venv differs from requirements.lock (locked, installed): {wrong}"


def test_installs_go_through_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^LOCK := requirements\.lock$", makefile, re.MULTILINE)
    assert re.search(r"^\$\(STAMP\): pyproject\.toml \$\(LOCK\)$", makefile, re.MULTILINE)
    assert "pip install -c $(LOCK) -e '.[$(EXTRAS)]'" in makefile
    assert 'pip install -c $(LOCK) "$(TORCH_SPEC)"' in makefile  # torch first, its deps pinned
    extras = re.search(r"^EXTRAS \?= (\S+)$", makefile, re.MULTILINE)
    assert extras and "s3" in extras.group(1).split(",")  # the moto tests need s3fs
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make install\b", ci, re.MULTILINE)
    assert "-c requirements.lock" in (ROOT / "Dockerfile").read_text(encoding="utf-8")
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert "requirements.lock" not in ignored
