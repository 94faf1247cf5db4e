"""Test helpers with real processes: a TCP proxy we can cut, and a `lethe serve` subprocess.

The proxy stands between the app and the shared PostgreSQL server so a test can make the
database "disappear" (every connection reset, new ones refused) without touching the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpProxy:
    """Forward 127.0.0.1:<port> to an upstream; `cut()` drops everything, `silence()` stops
    forwarding without closing anything, `restore()` heals."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._silent = threading.Event()  # accept and swallow everything, answer nothing
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():  # refuse: the peer sees the connection closed at once
                client.close()
                continue
            if self._silent.is_set():  # a connection that never hears back
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _swallow(self, sock: socket.socket) -> None:
        with suppress(OSError):
            while sock.recv(65536):
                pass

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self._silent.is_set():
                    continue  # dropped on the floor: nobody closes, nobody answers
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._open -= {src, dst}

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            sockets = list(self._open)
        for s in sockets:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def silence(self) -> None:
        """Stop forwarding without closing anything (packets dropped silently)."""
        self._silent.set()

    def restore(self) -> None:
        self._cut.clear()
        self._silent.clear()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()


def migrated_with_key(database_url: str, name: str, scope: str = "admin") -> str:
    """Migrate the database and create an API key in it; returns the key."""
    from service.api.auth import create_key
    from service.storage import migrate
    from service.storage.db import make_engine, make_session_factory, transaction

    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with transaction(make_session_factory(engine)) as s:
            _, secret = create_key(s, scope=scope, name=name)
    finally:
        engine.dispose()
    return secret


def proxied_database(database_url: str) -> tuple[TcpProxy, str]:
    """A TcpProxy in front of the database, and the URL that goes through it."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    return proxy, proxied


def server_env(tmp_path: Path, **lethe: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env |= {
        "LETHE_HOME": str(tmp_path / "home"),
        "LETHE_STORAGE_URL": str(tmp_path / "storage"),
        "LETHE_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }
    env |= {f"LETHE_{k.upper()}": v for k, v in lethe.items()}
    return env


@contextmanager
def lethe_server(
    env: dict[str, str], log_path: Path, *args: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `lethe serve --no-executor` (uvicorn) process; yields (base URL, process)."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--no-executor",
                "--port",
                str(port),
                *args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server not up: {log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
