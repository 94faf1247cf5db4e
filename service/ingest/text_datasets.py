"""JSONL text datasets for language models: one record per line, either
``{"id": ..., "text": ...}`` (loss on the whole text) or
``{"id": ..., "prompt": ..., "completion": ...}`` (loss on the completion; the prompt is the
extraction prefix). One shape per file; either may carry an optional integer ``label`` ≥ 0
(DESIGN §2: a text classifier's class), which the language-model engine ignores.

Every error is a ``DatasetError`` (a 422 at the API) whose message and ``errors`` entry name
the line number and the field. Nothing but ``json.loads`` touches the bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from service.engine import canonical_json
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
    label: int | None = None

    @property
    def shape(self) -> str:
        return "text" if self.text is not None else "prompt_completion"

    def sha256(self) -> str:
        """Content hash kept after the content is purged; the shape is part of it."""
        body: dict[str, Any] = {k: getattr(self, k) for k in SHAPES[self.shape] if k != "id"}
        if self.label is not None:
            body["label"] = self.label
        return hashlib.sha256(f"{self.shape}\x00{canonical_json(body)}".encode()).hexdigest()


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


def _label(line: int, obj: dict[str, Any]) -> int | None:
    value = obj.get("label")
    if value is None and "label" not in obj:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _error(line, "label", f"must be a non-negative integer, got {value!r}")
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
        unknown = sorted(set(obj) - set(SHAPES[got]) - {"label"})
        if unknown:
            raise _error(number, unknown[0], f"unknown field; a record is {_shapes()}")
        if shape is None:
            shape = got
        elif got != shape:
            raise _error(
                number,
                "text" if got == "text" else "prompt",
                f"line 1 set the shape {SHAPES[shape]}; one shape per file",
            )
        key = _string(number, obj, "id", MAX_KEY_LENGTH)
        if key in first_line:
            raise _error(number, "id", f"duplicate id {key!r} (first on line {first_line[key]})")
        first_line[key] = number
        label = _label(number, obj)
        if got == "text":
            records.append(
                TextRecord(key, text=_string(number, obj, "text", max_field_chars), label=label)
            )
        else:
            records.append(
                TextRecord(
                    key,
                    prompt=_string(number, obj, "prompt", max_field_chars),
                    completion=_string(number, obj, "completion", max_field_chars),
                    label=label,
                )
            )
    return records


def _shapes() -> str:
    forms = ("{" + ", ".join(f'"{f}"' for f in fields) + "}" for fields in SHAPES.values())
    return " or ".join(forms)


@dataclass
class TextCorpus:
    """A parsed text dataset: what registration stores per record and the worker reads."""

    records: list[TextRecord]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def shape(self) -> str:
        return self.records[0].shape if self.records else "text"

    def __len__(self) -> int:
        return len(self.records)

    def select(self, keys: list[str]) -> list[TextRecord]:
        """The named records in the order of ``keys``; KeyError names the missing ones."""
        index = {r.id: r for r in self.records}
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"records not in the dataset: {missing[:10]}")
        return [index[k] for k in keys]

    def meta(self) -> dict[str, Any]:
        labels = sorted({r.label for r in self.records if r.label is not None})
        labelled = sum(r.label is not None for r in self.records)
        return {"shape": self.shape, "labelled": labelled, "labels": labels[:1000]}


def load_text_corpus(src: bytes | Any) -> TextCorpus:
    """A JSONL dataset from bytes or a binary file (read up to the size bound)."""
    data = src if isinstance(src, bytes) else src.read(MAX_FILE_BYTES + 1)
    return TextCorpus(parse_text_jsonl(data))
