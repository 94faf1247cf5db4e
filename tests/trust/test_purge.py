"""Nothing kept that was forgotten: after jobs succeed, no file under the installation holds
the forgotten inputs' bytes; retained rows are still there; keys, sha256 and times remain."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from service.domain.forgetting import mark_forgotten
from service.ingest.datasets_io import load_tensor_npz
from service.storage.db import transaction
from service.storage.objects import Storage
from service.storage.tables import Dataset, Record, utcnow
from service.trust.audit import verify_chain
from service.trust.purge import purge_dataset, purge_pending
from tests.trust.conftest import get, run
from tests.worker.harness import Stack, Trained
from worker.context import Outcome
from worker.dataset_cache import DATASETS
from worker.reaper import Reaper


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _found(root: Path, patterns: dict[str, bytes]) -> dict[str, list[str]]:
    """Which patterns occur in which files (every byte of every file under root)."""
    hits: dict[str, list[str]] = {}
    for path in _files(root):
        data = path.read_bytes()
        for name, pattern in patterns.items():
            if pattern in data:
                hits.setdefault(name, []).append(str(path.relative_to(root)))
    return hits


def _unique_rows(inputs: np.ndarray, others: list[np.ndarray]) -> list[int]:
    """Rows whose bytes occur nowhere else (digits has a few duplicate images)."""
    seen: dict[bytes, int] = {}
    for arr in [inputs, *others]:
        for row in arr.astype(np.float64):
            seen[row.tobytes()] = seen.get(row.tobytes(), 0) + 1
    return [i for i, row in enumerate(inputs) if seen[row.astype(np.float64).tobytes()] == 1]


def test_forgotten_inputs_leave_every_file(stack: Stack, trained: Trained, tmp_path: Path) -> None:
    with np.load(io.BytesIO(trained.train_npz), allow_pickle=False) as f:
        ids, inputs = [str(i) for i in f["ids"]], f["inputs"]
    with np.load(io.BytesIO(trained.eval_npz)) as e, np.load(io.BytesIO(trained.probe_npz)) as p:
        others = [e["inputs"], p["inputs"]]
        probe_ids = {str(k) for k in p["ids"]}
    # The member probe holds copies of some training rows: forget others (a copy in another
    # dataset is another record, forgotten only when requested).
    unique = [i for i in _unique_rows(inputs, others) if f"p{i:04d}" not in probe_ids]
    forget_a, forget_b, keep = unique[:6], unique[6:14], unique[14:20]

    model = stack.register(trained, "mlp")
    train_id = stack.models[model]
    job_a = stack.submit(model, [ids[i] for i in forget_a])
    job_b = stack.submit(model, [ids[i] for i in forget_b])
    assert run(stack, job_a) == Outcome.SUCCEEDED
    # Queued behind it, job b was served by the same run (worker.coalescing).
    assert run(stack, job_b) == Outcome.FINISHED
    assert stack.job(job_b)["served_by"] == job_a and stack.job(job_b)["status"] == "succeeded"

    # The stored float32 rows, and their float64 form in case anything widened them.
    patterns = {}
    for i in forget_a + forget_b:
        patterns[f"f32:{ids[i]}"] = inputs[i].tobytes()
        patterns[f"f64:{ids[i]}"] = inputs[i].astype(np.float64).tobytes()
    kept_patterns = {f"keep:{ids[i]}": inputs[i].tobytes() for i in keep}
    # Everything this installation wrote: storage, the SQLite database (if any), LETHE_HOME.
    root = tmp_path
    assert _found(root, patterns) == {}
    kept_hits = _found(root, kept_patterns)
    assert set(kept_hits) == set(kept_patterns)
    storage_dir = Path(stack.settings.storage)
    with stack.sessions() as session:
        ds = session.get(Dataset, train_id)
        assert ds is not None
        assert ds.storage_key != f"datasets/{train_id}.npz" and ds.content_sha256 != ds.sha256
        assert Storage(str(storage_dir)).sha256(ds.storage_key) == ds.content_sha256
        # Exactly one file of this dataset remains: the rewritten one.
        files = [k for k in Storage(str(storage_dir)).iter_keys(f"datasets/{train_id}")]
        assert files == [ds.storage_key]
        assert all(kept_hits[f"keep:{ids[i]}"] == [f"storage/{ds.storage_key}"] for i in keep)
        # The worker's parsed copy followed the purge (rows dropped, not the file re-read):
        # it is the rewritten file's content exactly, without the forgotten rows.
        cached = DATASETS.get((ds.storage_key, ds.content_sha256))
        assert cached is not None
        with Storage(str(storage_dir)).open_read(ds.storage_key) as fh:
            parsed = load_tensor_npz(fh.read())
        assert cached.ids == parsed.ids and np.array_equal(cached.inputs, parsed.inputs)
        assert not {ids[i] for i in forget_a + forget_b} & set(cached.ids)
        rows = (
            session.execute(
                select(Record).where(Record.dataset_id == train_id, Record.state == "forgotten")
            )
            .scalars()
            .all()
        )
        assert sorted(r.key for r in rows) == sorted(ids[i] for i in forget_a + forget_b)
        assert all(r.forgotten_at and r.purged_at and len(r.content_sha256) == 64 for r in rows)
        assert verify_chain(session)["ok"]
    listed = get(stack, f"/v1/datasets/{train_id}/records", state="forgotten").json()["items"]
    assert len(listed) == 14 and all(item["purged_at"] for item in listed)
    events = get(stack, "/v1/audit", subject=f"dataset:{train_id}", action="content.purged").json()[
        "items"
    ]
    assert [e["payload"]["rows_removed"] for e in events] == [14]  # one run, one rewrite
    # The rewritten file still serves jobs: a third request loads its rows by key.
    job_c = stack.submit(model, [ids[i] for i in keep[:3]])
    assert run(stack, job_c) == Outcome.SUCCEEDED


def test_interrupted_purge_is_finished_by_the_reaper(
    sqlite_stack: Stack, trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = sqlite_stack
    model = stack.register(trained, "mlp")
    train_id = stack.models[model]
    keys = trained.train_ids[:5]
    job = stack.submit(model, keys)

    def storage_down(*_args, **_kwargs):
        raise OSError("object store unavailable")

    monkeypatch.setattr("service.trust.purge.purge_dataset", storage_down)
    assert run(stack, job) == Outcome.SUCCEEDED
    monkeypatch.undo()
    # The records are forgotten (the version is active) but their content is still stored.
    with stack.sessions() as session:
        pending = (
            session.execute(
                select(Record.purged_at).where(Record.dataset_id == train_id, Record.key.in_(keys))
            )
            .scalars()
            .all()
        )
        assert pending == [None] * 5
        key = session.get(Dataset, train_id).storage_key
    assert key == f"datasets/{train_id}.npz"

    with np.load(io.BytesIO(trained.train_npz)) as f:
        rows = {str(k): f["inputs"][i].tobytes() for i, k in enumerate(f["ids"]) if k in keys}
    assert set(_found(tmp_path, rows)) == set(keys)  # the scan sees them while they are there

    reaper = Reaper(stack.settings, stack.sessions, Storage(stack.settings.storage), actor="t")
    report = reaper.tick()
    assert report.purged == [train_id]
    assert _found(tmp_path, rows) == {}
    assert reaper.tick().purged == []  # idempotent


def test_text_dataset_purge(sqlite_stack: Stack, tmp_path: Path) -> None:
    stack = sqlite_stack
    lines = [
        {"id": f"t{i}", "text": f"secret sentence number {i} by person {i * 7}", "label": i % 3}
        for i in range(20)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    resp = stack.client.post(
        "/v1/datasets",
        headers=stack.headers,
        data={"name": "texts", "kind": "text", "role": "train"},
        files={"file": ("t.jsonl", content, "application/octet-stream")},
    )
    assert resp.status_code == 201, resp.text
    dataset_id = resp.json()["id"]
    forget = ["t3", "t11", "t19"]
    with transaction(stack.sessions) as session:
        assert mark_forgotten(session, dataset_id, forget, "job-x", utcnow()) == 3
    assert [
        r.dataset_id
        for r in purge_pending(stack.sessions, Storage(stack.settings.storage), actor="t")
    ] == [dataset_id]
    texts = {f"t{i}": line["text"].encode() for i, line in enumerate(lines)}
    hits = _found(tmp_path, texts)
    assert set(hits) == set(texts) - set(forget)
    with stack.sessions() as session:
        ds = session.get(Dataset, dataset_id)
        stored = Storage(stack.settings.storage).open_read(ds.storage_key).read()
    assert [json.loads(line)["id"] for line in stored.splitlines()] == [
        f"t{i}" for i in range(20) if f"t{i}" not in forget
    ]
    # A second purge has nothing to do and keeps the file.
    again = purge_dataset(stack.sessions, Storage(stack.settings.storage), dataset_id, actor="t")
    assert again.purged == 0 and again.new_key is None
