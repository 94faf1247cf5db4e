"""A small typed Python client for the Lethe v1 HTTP API (used by the CLI and the demo).

    from service.cli.api_client import LetheClient
    with LetheClient("http://127.0.0.1:8000", api_key="...") as lethe:
        ds = lethe.upload_dataset("train.npz", name="digits", kind="tensor", role="train")
        req = lethe.submit_deletion("digits-cnn", ds["id"], ["r1", "r2"])
        job = lethe.wait_for_job(req["job"]["id"], on_update=print)

Every non-2xx answer raises `LetheAPIError` carrying the server's problem+json document
(RFC 9457); a server that cannot be reached raises `LetheConnectionError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.domain.states import TERMINAL_JOB_STATES, RequestStatus

DEFAULT_URL = "http://127.0.0.1:8000"
_CHUNK = 1024 * 1024

JSONDict = dict[str, Any]
# A request in one of these states waits for nobody but a reviewer (or nothing at all).
SETTLED_REQUEST_STATES = tuple(
    s for s in RequestStatus if s not in (RequestStatus.QUEUED, RequestStatus.RUNNING)
)


class LetheError(Exception):
    """Base class of every error this client raises."""


class LetheConnectionError(LetheError):
    """The server could not be reached (refused, DNS, timeout)."""


class LetheAPIError(LetheError):
    """The server answered with an error; `problem` is its RFC 9457 problem document."""

    def __init__(self, problem: Mapping[str, Any]) -> None:
        self.problem: JSONDict = dict(problem)
        self.status: int = int(self.problem.get("status") or 0)
        self.title: str = str(self.problem.get("title") or "Error")
        self.detail: str = str(self.problem.get("detail") or "")
        self.type: str = str(self.problem.get("type") or "about:blank")
        self.errors: Any = self.problem.get("errors")
        super().__init__(f"{self.status} {self.title}: {self.detail}".rstrip(": "))


class ChecksumMismatch(LetheError):
    """A downloaded file does not hash to the sha256 the server published."""


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    sha256: str
    size_bytes: int
    resumed_from: int  # bytes already on disk that were kept (0 = full download)


def _problem_from(response: httpx.Response) -> JSONDict:
    """The response's problem document, or one synthesised from a non-problem error body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and ("title" in body or "type" in body):
        body.setdefault("status", response.status_code)
        return body
    problem: JSONDict = {"title": response.reason_phrase or "Error", "status": response.status_code}
    if isinstance(body, dict) and "detail" in body:  # e.g. a framework's {"detail": ...}
        detail = body["detail"]
        problem["detail"] = detail if isinstance(detail, str) else json.dumps(detail)
    else:
        problem["detail"] = response.text.strip()[:500]
    return problem


def sha256_file(path: Path, *, chunk_size: int = _CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class LetheClient:
    """Synchronous client. `url` and `api_key` default to LETHE_URL and LETHE_API_KEY."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("LETHE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("LETHE_API_KEY", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers["User-Agent"] = "lethe-client"
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LetheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise LetheConnectionError(f"cannot reach Lethe at {self.url}: {exc}") from exc
        if response.is_error:
            raise LetheAPIError(_problem_from(response))
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    @staticmethod
    def _query(**params: Any) -> dict[str, Any]:
        return {k: v for k, v in params.items() if v is not None}

    def _iterate(self, path: str, **params: Any) -> Iterator[JSONDict]:
        """Follow `next_cursor` through every page of a list endpoint."""
        cursor = None
        while True:
            page = self._json("GET", path, params=self._query(cursor=cursor, **params))
            yield from page.get("items", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # -- health -----------------------------------------------------------------------------
    def healthz(self) -> JSONDict:
        return self._json("GET", "/healthz")

    def readyz(self) -> JSONDict:
        return self._json("GET", "/readyz")

    # -- datasets ---------------------------------------------------------------------------
    def upload_dataset(self, path: str | Path, *, name: str, kind: str, role: str) -> JSONDict:
        path = Path(path)
        with open(path, "rb") as fh:  # httpx streams the file; it is never read whole
            files = {"file": (path.name, fh, "application/octet-stream")}
            data = {"name": name, "kind": kind, "role": role}
            return self._json("POST", "/v1/datasets", files=files, data=data)

    def list_datasets(self, *, cursor: str | None = None, limit: int | None = None) -> JSONDict:
        return self._json("GET", "/v1/datasets", params=self._query(cursor=cursor, limit=limit))

    def iter_datasets(self) -> Iterator[JSONDict]:
        return self._iterate("/v1/datasets")

    def get_dataset(self, dataset_id: str) -> JSONDict:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def list_records(
        self,
        dataset_id: str,
        *,
        state: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> JSONDict:
        params = self._query(state=state, cursor=cursor, limit=limit)
        return self._json("GET", f"/v1/datasets/{dataset_id}/records", params=params)

    def iter_records(self, dataset_id: str, *, state: str | None = None) -> Iterator[JSONDict]:
        return self._iterate(f"/v1/datasets/{dataset_id}/records", state=state)

    # -- models and versions ----------------------------------------------------------------
    def register_model(
        self,
        spec: Mapping[str, Any],
        weights: str | Path,
        extra_files: Mapping[str, str | Path] | None = None,
    ) -> JSONDict:
        """`extra_files`: form field -> path, e.g. a causal LM's `config`, `tokenizer` and
        `tokenizer_config`."""
        parts = {"weights": Path(weights), **{k: Path(v) for k, v in (extra_files or {}).items()}}
        with contextlib.ExitStack() as stack:
            files = {
                field: (
                    path.name,
                    stack.enter_context(open(path, "rb")),
                    "application/octet-stream",
                )
                for field, path in parts.items()
            }
            return self._json(
                "POST", "/v1/models", files=files, data={"spec": json.dumps(dict(spec))}
            )

    def list_models(self, *, cursor: str | None = None, limit: int | None = None) -> JSONDict:
        return self._json("GET", "/v1/models", params=self._query(cursor=cursor, limit=limit))

    def iter_models(self) -> Iterator[JSONDict]:
        return self._iterate("/v1/models")

    def get_model(self, name: str) -> JSONDict:
        return self._json("GET", f"/v1/models/{name}")

    def list_versions(
        self, name: str, *, cursor: str | None = None, limit: int | None = None
    ) -> JSONDict:
        params = self._query(cursor=cursor, limit=limit)
        return self._json("GET", f"/v1/models/{name}/versions", params=params)

    def get_version(self, version_id: str) -> JSONDict:
        return self._json("GET", f"/v1/model-versions/{version_id}")

    def promote_version(self, version_id: str) -> JSONDict:
        """Make a candidate version active (admin scope)."""
        return self._json("POST", f"/v1/model-versions/{version_id}/promote")

    def reject_version(self, version_id: str) -> JSONDict:
        """Reject a candidate version (admin scope)."""
        return self._json("POST", f"/v1/model-versions/{version_id}/reject")

    def download_checkpoint(
        self,
        version_id: str,
        dest: str | Path,
        *,
        resume: bool = True,
        max_attempts: int = 3,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> DownloadResult:
        """Download a version's checkpoint to `dest`, checking it against the published sha256.

        Bytes go to `dest + ".part"` first; an existing partial file is continued with a
        `Range` request (an interrupted transfer is also resumed, up to `max_attempts`).
        If the finished file does not match and part of it came from an earlier attempt,
        it is downloaded once more from scratch before `ChecksumMismatch` is raised.
        `progress(done_bytes, total_bytes)` is called as data arrives.
        """
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        expected = str(self.get_version(version_id)["sha256"]).lower()
        if not resume and part.exists():
            part.unlink()

        kept: int | None = None
        for attempt in range(1, max_attempts + 1):
            try:
                kept_now = self._fetch_into(version_id, part, expected, progress)
                kept = kept_now if kept is None else kept
                break
            except (httpx.TransportError, LetheConnectionError):
                if attempt == max_attempts:
                    raise
                time.sleep(0.2 * attempt)  # a dropped connection: continue where it stopped

        actual = sha256_file(part)
        if actual != expected and kept:
            part.unlink()  # the kept prefix was bad: one clean download
            kept = 0
            self._fetch_into(version_id, part, expected, progress)
            actual = sha256_file(part)
        if actual != expected:
            part.unlink()
            raise ChecksumMismatch(
                f"checkpoint of version {version_id} hashes to {actual}, server says {expected}"
            )
        os.replace(part, dest)
        return DownloadResult(dest, actual, dest.stat().st_size, kept or 0)

    def _fetch_into(
        self,
        version_id: str,
        part: Path,
        expected_sha: str,
        progress: Callable[[int, int | None], None] | None,
    ) -> int:
        """Write the checkpoint (or its missing tail) into `part`; returns the bytes kept."""
        have = part.stat().st_size if part.exists() else 0
        headers = {}
        if have:
            # If-Range: a changed file (different ETag) is sent whole instead of a wrong tail.
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{expected_sha}"'}
        url = f"/v1/model-versions/{version_id}/checkpoint"
        try:
            with self._http.stream("GET", url, headers=headers) as response:
                if response.status_code == 416 and have:
                    return have  # already complete; the hash check decides
                if response.is_error:
                    response.read()
                    raise LetheAPIError(_problem_from(response))
                append = response.status_code == 206 and have > 0
                done = have if append else 0
                length = response.headers.get("Content-Length")
                total = done + int(length) if length is not None else None
                with open(part, "ab" if append else "wb") as fh:
                    for chunk in response.iter_bytes(_CHUNK):
                        fh.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                return have if append else 0
        except httpx.ConnectError as exc:
            raise LetheConnectionError(f"cannot reach Lethe at {self.url}: {exc}") from exc

    # -- deletion requests ------------------------------------------------------------------
    def submit_deletion(
        self,
        model: str,
        dataset: str,
        record_keys: Sequence[str],
        *,
        method: str = "imu",
        params: Mapping[str, Any] | None = None,
        subject_ref: str | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> JSONDict:
        """POST a deletion request; returns `{id, status, job: {id, status}}` (202)."""
        body: JSONDict = {
            "model": model,
            "dataset": dataset,
            "record_keys": list(record_keys),
            "method": method,
            "params": dict(params or {}),
        }
        if subject_ref is not None:
            body["subject_ref"] = subject_ref
        if reason is not None:
            body["reason"] = reason
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/deletion-requests", json=body, headers=headers)

    def get_deletion_request(self, request_id: str) -> JSONDict:
        return self._json("GET", f"/v1/deletion-requests/{request_id}")

    def list_requests(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        subject_ref: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> JSONDict:
        """One page of deletion requests, newest first, optionally filtered."""
        params = self._query(
            status=status, model=model, subject_ref=subject_ref, cursor=cursor, limit=limit
        )
        return self._json("GET", "/v1/deletion-requests", params=params)

    def iter_requests(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        subject_ref: str | None = None,
    ) -> Iterator[JSONDict]:
        return self._iterate(
            "/v1/deletion-requests", status=status, model=model, subject_ref=subject_ref
        )

    def get_receipt(self, request_id: str) -> JSONDict:
        """`{jws, kid, payload}` of a completed request (409 otherwise)."""
        return self._json("GET", f"/v1/deletion-requests/{request_id}/receipt")

    def wait_for_request(
        self,
        request_id: str,
        poll_interval: float = 0.5,
        *,
        timeout: float | None = None,
        on_update: Callable[[JSONDict], None] | None = None,
    ) -> JSONDict:
        """Follow the request's job to its end, then return the request in its final state:
        `completed`, `needs_review` (held by the release policy), `failed` or `cancelled`.

        `on_update(job)` sees every poll of the job (for progress bars)."""
        request = self.get_deletion_request(request_id)
        job_id = (request.get("job") or {}).get("id")
        if job_id and request.get("status") not in SETTLED_REQUEST_STATES:
            self.wait_for_job(
                str(job_id), poll_interval=poll_interval, timeout=timeout, on_update=on_update
            )
        deadline = time.monotonic() + 30.0
        while True:
            request = self.get_deletion_request(request_id)
            if request.get("status") in SETTLED_REQUEST_STATES or time.monotonic() > deadline:
                return request
            time.sleep(min(poll_interval, 0.5))

    # -- jobs -------------------------------------------------------------------------------
    def list_jobs(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> JSONDict:
        params = self._query(status=status, model=model, cursor=cursor, limit=limit)
        return self._json("GET", "/v1/jobs", params=params)

    def iter_jobs(
        self, *, status: str | None = None, model: str | None = None
    ) -> Iterator[JSONDict]:
        return self._iterate("/v1/jobs", status=status, model=model)

    def get_job(self, job_id: str) -> JSONDict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> JSONDict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def wait_for_job(
        self,
        job_id: str,
        *,
        poll_interval: float = 0.5,
        timeout: float | None = None,
        on_update: Callable[[JSONDict], None] | None = None,
    ) -> JSONDict:
        """Poll until the job is succeeded, failed or cancelled; returns the final job.

        `on_update(job)` sees every poll (for progress bars). Raises TimeoutError after
        `timeout` seconds; the job itself keeps running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
            if job.get("status") in TERMINAL_JOB_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout}s")
            time.sleep(poll_interval)

    # -- audit ------------------------------------------------------------------------------
    def list_audit(
        self,
        *,
        subject_type: str | None = None,
        subject_id: str | None = None,
        action: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> JSONDict:
        """One page of audit events, oldest first, optionally filtered."""
        params = self._query(
            subject_type=subject_type,
            subject_id=subject_id,
            action=action,
            cursor=cursor,
            limit=limit,
        )
        return self._json("GET", "/v1/audit", params=params)

    def verify_audit(self) -> JSONDict:
        """`{ok, checked, head_hash, first_bad_seq}` from the server's chain check."""
        return self._json("GET", "/v1/audit/verify")
