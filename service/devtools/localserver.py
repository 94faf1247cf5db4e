"""Run `lethe serve` as a background subprocess on a free port (the demo and the CLI tests).

The child gets its own process group, so stopping it also stops the embedded executor it
spawns; nothing is left running after `stop()`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

# Settings that would point the child away from the embedded defaults under its home.
_NON_EMBEDDED = (
    "LETHE_DATABASE_URL",
    "LETHE_BROKER_URL",
    "LETHE_RESULT_BACKEND_URL",
    "LETHE_STORAGE_URL",
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def lethe_command(*args: str) -> list[str]:
    """argv running the `lethe` CLI of this very interpreter (no reliance on PATH)."""
    script = Path(sys.executable).with_name("lethe")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from service.cli import app; app(prog_name='lethe')", *args]


class ServiceError(RuntimeError):
    """The service did not start, or a setup command failed; the message quotes its output."""


class LocalService:
    """`lethe migrate`, then `lethe serve` in the background; `create_key` for an admin key.

    `env` is applied on top of the current environment. With `embedded=True` the database,
    broker and storage settings are removed, so everything lives under `home`.
    """

    def __init__(
        self,
        home: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        embedded: bool = True,
        log_path: Path | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path or self.home / "service.log"
        self._env = dict(os.environ)
        if embedded:
            for var in _NON_EMBEDDED:
                self._env.pop(var, None)
        self._env["LETHE_HOME"] = str(self.home)
        self._env.update(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return dict(self._env)

    def run_cli(self, *args: str, timeout: float = 120) -> str:
        """Run a `lethe` command with this service's environment; returns its stdout."""
        proc = subprocess.run(
            lethe_command(*args), env=self._env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise ServiceError(
                f"`lethe {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def migrate(self) -> None:
        self.run_cli("migrate")

    def create_key(self, scope: str = "admin", name: str | None = None) -> str:
        """Create an API key offline against the service's database; returns the secret."""
        name = name or f"{scope}-{uuid.uuid4().hex[:8]}"
        lines = [
            ln.strip()
            for ln in self.run_cli("keys", "create", "--scope", scope, "--name", name).splitlines()
            if ln.strip()
        ]
        if not lines:
            raise ServiceError("`lethe keys create` printed no key")
        return lines[-1]

    def start(self, *, timeout: float = 90.0, extra_args: Sequence[str] = ()) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.migrate()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child
        self._proc = subprocess.Popen(
            lethe_command("serve", "--host", self.host, "--port", str(self.port), *extra_args),
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches the executor too
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                self._close_log()
                raise ServiceError(
                    f"`lethe serve` exited with {self._proc.returncode}; log:\n{self.log_tail()}"
                )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2.0)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.TransportError as exc:
                last = str(exc)
            time.sleep(0.2)
        self.stop()
        raise ServiceError(f"service not ready after {timeout}s ({last}); log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL after `timeout`; returns the exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(10)
            # The executor child may outlive the server by a moment; make sure it is gone.
            self._wait_group_gone(proc.pid, timeout)
            return proc.returncode
        finally:
            self._close_log()

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
