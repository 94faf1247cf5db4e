"""Trust, round 3, against a real `lethe serve` (uvicorn) on PostgreSQL with a real worker
process: receipts that cannot mislead (an edited payload copy, a checkpoint offered as a
receipt, `completed` before the purge finished), oversized safetensors headers, duplicate
JSON keys, and who may read `/metrics`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from jwcrypto import jwk, jwt
from jwcrypto.common import JWException
from sqlalchemy import update

from bench.families import Family, family
from service.api.auth import create_key
from service.devtools.localserver import lethe_command
from service.storage import migrate
from service.storage.db import make_engine, make_session_factory, transaction
from service.storage.tables import Record
from service.trust.audit_checkpoints import AUDIENCE as CHECKPOINT_AUDIENCE
from service.trust.receipts import AUDIENCE
from tests.service.netfaults import lethe_server, migrated_with_key, proxied_database, server_env
from tests.worker.harness import WorkerProcess, poll

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def digits_family() -> Family:
    return family("digits-mlp")


@pytest.fixture
def server(postgres_url: str, tmp_path: Path) -> Iterator[dict]:
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as s:
        _, admin = create_key(s, scope="admin", name="admin")
        _, reader = create_key(s, scope="read", name="reader")
    env = server_env(tmp_path, database_url=postgres_url)
    worker = WorkerProcess([sys.executable, "-m", "worker.embedded"], env, tmp_path / "w.log")
    try:
        with lethe_server(env, tmp_path / "server.log") as (base, _proc):
            worker.start()
            client = httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=60
            )
            yield {"base": base, "http": client, "reader": reader, "sessions": sessions, "env": env}
            client.close()
    finally:
        worker.stop()
        engine.dispose()


def _completed_request(server: dict, fam: Family) -> dict:
    http = server["http"]

    def upload(name: str, role: str, content: bytes) -> str:
        resp = http.post(
            "/v1/datasets",
            data={"name": name, "kind": "tensor", "role": role},
            files={"file": (f"{name}.npz", content)},
        )
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    train = upload("train", "train", fam.npz(None))
    evals = upload("eval", "eval", fam.npz(None, "eval"))
    recipe = {**fam.recipe_json(), "datasets": [train]}
    spec = {
        "name": "mlp",
        "architecture": fam.architecture,
        "arch_kwargs": fam.arch_kwargs,
        "eval_dataset": evals,
        "recipe": recipe,
    }
    weights = fam.trained().weights["model"]
    resp = http.post("/v1/models", data={"spec": json.dumps(spec)}, files={"weights": weights})
    assert resp.status_code == 201, resp.text
    body = {"model": "mlp", "dataset": train, "record_keys": fam.ids[:10]}
    request_id = http.post("/v1/deletion-requests", json=body).json()["id"]
    done = poll(
        lambda: (
            (r := http.get(f"/v1/deletion-requests/{request_id}").json())["status"]
            in ("completed", "needs_review", "failed")
            and r
        ),
        timeout=300,
    )
    assert done["status"] == "completed", done
    return done


def test_receipts_cannot_mislead(server: dict, digits_family: Family, tmp_path: Path) -> None:
    http = server["http"]
    request = _completed_request(server, digits_family)
    receipt = poll(
        lambda: (
            (r := http.get(f"/v1/deletion-requests/{request['id']}/receipt")).status_code == 200
            and r.json()
        ),
        timeout=30,
    )
    jwks_url = server["base"] + "/.well-known/jwks.json"

    def verify(document: dict) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "receipt.json"
        path.write_text(json.dumps(document))
        return subprocess.run(
            lethe_command("receipt", "verify", str(path), "--jwks", jwks_url),
            capture_output=True,
            text=True,
            timeout=60,
            env=server["env"],
        )

    assert verify(receipt).returncode == 0
    # The unsigned copy edited: the signed payload still verifies, so the copy must not pass.
    edited = json.loads(json.dumps(receipt))
    edited["payload"]["records"]["count"] = 1
    result = verify(edited)
    assert result.returncode == 1 and "payload` copy differs" in result.stderr, result.stderr

    # A generic JOSE library asked for a receipt's audience refuses an audit checkpoint
    # signed by the same key, and accepts the receipt.
    keys = jwk.JWKSet.from_json(httpx.get(jwks_url).text)
    token = jwt.JWT(jwt=receipt["jws"], key=keys, check_claims={"aud": AUDIENCE})
    assert json.loads(token.claims)["sub"] == request["id"]
    checkpoint = receipt["payload"]["audit"]["checkpoint"]["jws"]
    with pytest.raises(JWException):
        jwt.JWT(jwt=checkpoint, key=keys, check_claims={"aud": AUDIENCE})
    claims = jwt.JWT(jwt=checkpoint, key=keys, check_claims={"aud": CHECKPOINT_AUDIENCE})
    assert json.loads(claims.claims)["aud"] == CHECKPOINT_AUDIENCE

    # `completed` while the purge is still running (the reaper's step, made to lag here):
    # not a 409 but a 503 that says when to come back.
    with transaction(server["sessions"]) as s:
        s.execute(
            update(Record)
            .where(Record.key == digits_family.ids[0], Record.state == "forgotten")
            .values(purged_at=None)
        )
    pending = http.get(f"/v1/deletion-requests/{request['id']}/receipt")
    assert pending.status_code == 503, pending.text
    assert pending.headers["retry-after"] == "2"
    assert pending.headers["content-type"].startswith("application/problem+json")
    assert pending.json()["type"].endswith("/erasure-pending")


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_oversized_headers_and_duplicate_keys_are_refused(
    server: dict, digits_family: Family
) -> None:
    http = server["http"]
    arch = {"in_features": 2, "hidden": [], "num_classes": 2}
    spec = json.dumps({"name": "big", "architecture": "mlp", "arch_kwargs": arch})
    tensors = {
        "fc.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "fc.bias": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
    }
    # 2 MB of free-form metadata (a 90 MB one used to be parsed whole).
    weights = _safetensors({"__metadata__": {"junk": "x" * 2_000_000}, **tensors}, bytes(24))
    resp = http.post("/v1/models", data={"spec": spec}, files={"weights": weights})
    assert resp.status_code == 422, resp.text
    assert "__metadata__" in resp.json()["detail"]
    huge = struct.pack("<Q", 17 * 1024 * 1024) + b"{" + b" " * 1024
    resp = http.post("/v1/models", data={"spec": spec}, files={"weights": huge})
    assert resp.status_code == 422 and "exceeds" in resp.json()["detail"]
    assert http.get("/v1/models").json()["items"] == []

    # The same key twice in a deletion request: refused, naming it.
    raw = '{"model": "a", "model": "b", "dataset": "d", "record_keys": ["k"]}'
    resp = http.post(
        "/v1/deletion-requests", content=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"] == [{"field": "body.model", "message": "duplicate key"}]


def test_metrics_need_a_read_key_unless_opened(
    server: dict, postgres_url: str, tmp_path: Path
) -> None:
    base = server["base"]
    assert httpx.get(base + "/metrics").status_code == 401
    reader = {"Authorization": f"Bearer {server['reader']}"}
    got = httpx.get(base + "/metrics", headers=reader)
    assert got.status_code == 200 and "lethe_jobs" in got.text
    env = server_env(tmp_path / "open", database_url=postgres_url, metrics_auth="open")
    with lethe_server(env, tmp_path / "open.log") as (open_base, _):
        assert httpx.get(open_base + "/metrics").status_code == 200


def _post_huge(base: str, key: str | None, *, declared: int, chunked: bool = False) -> tuple:
    """A raw POST announcing `declared` bytes of JSON, of which it sends a little (or, chunked,
    keeps streaming until answered); (status, seconds, bytes the socket accepted before the
    answer). A server that refuses without reading stops accepting once the socket buffers fill,
    so the byte count proves what a wall-clock bound on a loaded machine cannot."""
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    head = [
        "POST /v1/deletion-requests HTTP/1.1",
        f"Host: {url.hostname}",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {declared}",
    ]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    start = time.monotonic()
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    piece = b'{"record_keys": [' + b'"k", ' * 13000
    sock.setblocking(False)
    answer = b""
    sent = 0
    while b"\r\n" not in answer and time.monotonic() - start < 10:
        try:
            answer += sock.recv(4096)
        except BlockingIOError:
            if sent < declared:
                try:
                    sock.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    sent += len(piece)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
            time.sleep(0.001)
        except ConnectionResetError:
            break
    seconds = time.monotonic() - start
    sock.close()
    return int(answer.split(b" ", 2)[1]) if answer else None, seconds, sent


def test_big_bodies_cost_nothing_before_the_key_and_the_limit(server: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    base, admin = server["base"], server["http"].headers["authorization"].split()[1]
    pid = next(
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "serve" in (p.info["cmdline"] or [])
        and server["base"].rsplit(":", 1)[1] in (p.info["cmdline"] or [])
    )
    rss = psutil.Process(pid).memory_info().rss
    body = 118 * 1024 * 1024
    cases = [None, "lethe_not-a-key", admin] * 7  # 21 at once, with and without a valid key
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda k: _post_huge(base, k, declared=body), cases))
    grown = psutil.Process(pid).memory_info().rss - rss
    for key, (status, seconds, sent) in zip(cases, results, strict=True):
        assert status == (413 if key == admin else 401), (key, status)
        # Answered from the headers: at most the socket buffers' worth was ever sent.
        assert sent < body // 8, (key, sent)
        assert seconds < 5.0, (key, seconds)
    assert grown < 50 * 1024 * 1024, grown
    # Chunked (no Content-Length): counted while streaming, refused past LETHE_MAX_JSON_MB.
    status, seconds, sent = _post_huge(base, admin, declared=body, chunked=True)
    assert status == 413 and seconds < 5.0 and sent < body // 2, (status, seconds, sent)
    # The connection pool is fine afterwards.
    assert server["http"].get("/v1/models").status_code == 200


def test_a_database_that_stops_answering_is_503_within_bounds(
    postgres_url: str, tmp_path: Path
) -> None:
    import time

    secret = migrated_with_key(postgres_url, "ops")
    proxy, proxied = proxied_database(postgres_url)
    env = server_env(tmp_path, database_url=proxied, auth_cache_seconds="0")
    auth = {"Authorization": f"Bearer {secret}"}
    try:
        with lethe_server(env, tmp_path / "server.log") as (base, _proc):
            http = httpx.Client(base_url=base, timeout=60)
            for _ in range(5):  # pooled connections that will go silent
                assert http.get("/v1/models", headers=auth).status_code == 200
            proxy.silence()

            def timed(path: str, **kw: object) -> tuple[int, float]:
                t0 = time.monotonic()
                status = http.get(path, **kw).status_code  # type: ignore[arg-type]
                return status, time.monotonic() - t0

            status, seconds = timed("/readyz")
            assert status == 503 and seconds < 5.0, (status, seconds)
            for path in ("/v1/models", "/v1/jobs", "/v1/deletion-requests"):
                status, seconds = timed(path, headers=auth)
                assert status == 503 and seconds < 10.0, (path, status, seconds)
            proxy.restore()
            deadline = time.monotonic() + 30
            while http.get("/v1/models", headers=auth).status_code != 200:
                assert time.monotonic() < deadline, "did not recover"
                time.sleep(0.5)
            assert http.get("/readyz").status_code == 200
    finally:
        proxy.close()


def _npz(n: int) -> bytes:
    import io

    import numpy as np

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    inputs = rng.random((n, 64), dtype=np.float32)
    np.savez(
        buf, ids=np.array([f"r{i}" for i in range(n)]), inputs=inputs, labels=rng.integers(0, 10, n)
    )
    return buf.getvalue()


@pytest.fixture
def tiny_store(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as the object store (mounting needs CAP_SYS_ADMIN: root here and in CI)."""
    mount_point = tmp_path / "tiny-store"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs to fill (needs CAP_SYS_ADMIN): {done.stderr}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_object_store_is_507_and_stores_nothing(
    postgres_url: str, tmp_path: Path, tiny_store: Path
) -> None:
    secret = migrated_with_key(postgres_url, "full")
    env = server_env(tmp_path, database_url=postgres_url) | {"LETHE_STORAGE_URL": str(tiny_store)}
    auth = {"Authorization": f"Bearer {secret}"}
    with lethe_server(env, tmp_path / "server.log") as (base, _proc):
        http = httpx.Client(base_url=base, headers=auth, timeout=60)
        big = _npz(8000)  # 2 MiB of inputs: more than the store holds
        small = _npz(20)
        for _ in range(3):  # and the same connection keeps answering
            resp = http.post(
                "/v1/datasets",
                data={"name": "big", "kind": "tensor", "role": "train"},
                files={"file": ("big.npz", big)},
            )
            assert resp.status_code == 507, resp.text
            assert resp.headers["retry-after"] == "60"
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["type"].endswith("/storage-full")
        assert [p for p in tiny_store.rglob("*") if p.is_file()] == []  # no partial file
        assert http.get("/v1/datasets").json()["items"] == []
        ok = http.post(
            "/v1/datasets",
            data={"name": "small", "kind": "tensor", "role": "train"},
            files={"file": ("small.npz", small)},
        )
        assert ok.status_code == 201, ok.text


def test_a_worker_process_starts_while_the_database_is_down_and_recovers(
    postgres_url: str, tmp_path: Path
) -> None:
    """`lethe serve` refuses to start without a database (its preflight), but a worker process
    (re)starting during a blip used to raise in its start-up check, and uvicorn then stopped
    the whole server (seen in CI). The app's start-up now logs it and serves 503 until the
    database is back."""
    import time

    from starlette.testclient import TestClient

    from service.api.app import create_app
    from service.settings import load_settings

    migrate.upgrade(postgres_url)
    proxy, proxied = proxied_database(postgres_url)
    settings = load_settings(
        database_url=proxied, home=str(tmp_path / "home"), storage_url=str(tmp_path / "s")
    )
    proxy.cut()
    try:
        with TestClient(create_app(settings)) as client:  # the lifespan runs here
            assert client.get("/readyz").status_code == 503
            proxy.restore()
            deadline = time.monotonic() + 30
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "did not recover"
                time.sleep(0.5)
    finally:
        proxy.close()
