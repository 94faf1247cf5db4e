"""JSONL text datasets for language models: one record per line, either
``{"id": ..., "text": ...}`` (loss on the whole text) or
``{"id": ..., "prompt": ..., "completion": ...}`` (loss on the completion; the prompt is the
extraction prefix). One shape per file.

Every error is a ``DatasetError`` (a 422 at the API) whose message and ``errors`` entry name
the line number and the field. Nothing but ``json.loads`` touches the bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from service.ingest.datasets_io import MAX_KEY_LENGTH, DatasetError

MAX_FILE_BYTES = 256 << 20
MAX_LINE_BYTES = 1 << 20
MAX_RECORDS = 1_000_000
MAX_FIELD_CHARS = 200_000
SHAPES: dict[str, tuple[str, ...]] = {
    "text": ("id", "text"),
    "prompt_completion": ("id", "prompt", "completion"),
}


@dataclass(frozen=True)
class TextRecord:
    id: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    @property
    def shape(self) -> str:
        return "text" if self.text is not None else "prompt_completion"

    def sha256(self) -> str:
        """Content hash kept after the content is purged; the shape is part of it."""
        body = {k: getattr(self, k) for k in SHAPES[self.shape] if k != "id"}
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(f"{self.shape}\x00{canonical}".encode()).hexdigest()


def _error(line: int, field: str, message: str) -> DatasetError:
    where = f"line {line}" + (f", field {field!r}" if field else "")
    return DatasetError(f"{where}: {message}", [{"line": line, "field": field, "message": message}])


def _no_duplicate_keys(line: int):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _error(line, key, "appears twice in the object")
            out[key] = value
        return out

    return hook


def _string(line: int, obj: dict[str, Any], field: str, limit: int) -> str:
    value = obj.get(field)
    if not isinstance(value, str):
        raise _error(line, field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _error(line, field, "must not be empty")
    if "\x00" in value:
        raise _error(line, field, "contains a NUL character")
    if len(value) > limit:
        raise _error(line, field, f"longer than {limit} characters")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_text_jsonl(
    data: bytes,
    *,
    max_records: int = MAX_RECORDS,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_field_chars: int = MAX_FIELD_CHARS,
) -> list[TextRecord]:
    """Parse and validate a whole JSONL file (bytes); a final newline is optional, blank
    lines are errors (they usually mean a broken export)."""
    if len(data) > MAX_FILE_BYTES:
        raise DatasetError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise DatasetError("the dataset has no records", [{"field": "file", "message": "empty"}])
    if len(lines) > max_records:
        raise DatasetError(f"more than {max_records} records")
    records: list[TextRecord] = []
    first_line: dict[str, int] = {}
    shape: str | None = None
    for number, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\r")
        if len(raw) > max_line_bytes:
            raise _error(number, "", f"longer than {max_line_bytes} bytes")
        if not raw.strip():
            raise _error(number, "", "blank line")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _error(number, "", "not valid UTF-8") from None
        try:
            obj = json.loads(
                text, object_pairs_hook=_no_duplicate_keys(number), parse_constant=_reject_constant
            )
        except json.JSONDecodeError as exc:
            raise _error(number, "", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, DatasetError):
                raise
            raise _error(number, "", f"invalid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise _error(number, "", "expected a JSON object")
        got = "text" if "text" in obj else "prompt_completion"
        unknown = sorted(set(obj) - set(SHAPES[got]))
        if unknown:
            raise _error(number, unknown[0], f"unknown field; a record is {_shapes()}")
        if shape is None:
            shape = got
        elif got != shape:
            raise _error(number, "text" if got == "text" else "prompt",
                         f"line 1 set the shape {SHAPES[shape]}; one shape per file")  # fmt: skip
        key = _string(number, obj, "id", MAX_KEY_LENGTH)
        if key in first_line:
            raise _error(number, "id", f"duplicate id {key!r} (first on line {first_line[key]})")
        first_line[key] = number
        if got == "text":
            records.append(TextRecord(key, text=_string(number, obj, "text", max_field_chars)))
        else:
            records.append(TextRecord(
                key, prompt=_string(number, obj, "prompt", max_field_chars),
                completion=_string(number, obj, "completion", max_field_chars),
            ))  # fmt: skip
    return records


def _shapes() -> str:
    forms = ("{" + ", ".join(f'"{f}"' for f in fields) + "}" for fields in SHAPES.values())
    return " or ".join(forms)
