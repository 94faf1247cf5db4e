"""JSONL text datasets for language models: typed records, errors naming line and field."""

from __future__ import annotations

import json

import pytest

from service.ingest.datasets_io import DatasetError
from service.ingest.text_datasets import TextRecord, parse_text_jsonl


def _jsonl(*objs: object) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


def test_both_shapes_parse_into_typed_records() -> None:
    pairs = parse_text_jsonl(
        _jsonl(
            {"id": "a", "prompt": "Who is Kalo?", "completion": " A beekeeper."},
            {"id": "b", "prompt": "Who is Miren?", "completion": " A luthier. ünïcode"},
        )
    )
    assert pairs == [
        TextRecord("a", prompt="Who is Kalo?", completion=" A beekeeper."),
        TextRecord("b", prompt="Who is Miren?", completion=" A luthier. ünïcode"),
    ]
    assert pairs[0].shape == "prompt_completion"
    texts = parse_text_jsonl(b'{"id": "x", "text": "one"}\r\n{"id": "y", "text": "two"}')
    assert [r.text for r in texts] == ["one", "two"] and texts[0].shape == "text"
    # The hash covers the content and the shape, not the id.
    assert texts[0].sha256() == TextRecord("other", text="one").sha256()
    assert texts[0].sha256() != TextRecord("x", prompt="o", completion="ne").sha256()
    labelled = parse_text_jsonl(b'{"id": "x", "text": "one", "label": 2}\n')
    assert labelled[0].label == 2 and labelled[0].sha256() != texts[0].sha256()


@pytest.mark.parametrize(
    ("body", "line", "field", "message"),
    [
        (_jsonl({"id": "a", "text": "t"}, {"id": "a", "text": "u"}), 2, "id", "duplicate id 'a'"),
        (_jsonl({"id": "a", "text": "t"}, {"id": "b", "text": ""}), 2, "text", "must not be empty"),
        (_jsonl({"id": "a", "text": "t\u0000x"}), 1, "text", "NUL"),
        (_jsonl({"id": 7, "text": "t"}), 1, "id", "must be a string"),
        (_jsonl({"id": "a", "prompt": "p"}), 1, "completion", "must be a string"),
        (_jsonl({"id": "a", "text": "t", "labels": 1}), 1, "labels", "unknown field"),
        (_jsonl({"id": "a", "text": "t", "label": "x"}), 1, "label", "non-negative integer"),
        (_jsonl({"id": "a", "text": "t", "label": True}), 1, "label", "non-negative integer"),
        (
            _jsonl({"id": "a", "text": "t"}, {"id": "b", "prompt": "p", "completion": "c"}),
            2,
            "prompt",
            "one shape per file",
        ),
        (b'{"id": "a", "text": "t", "text": "u"}\n', 1, "text", "appears twice"),
        (b'{"id": "a", "text": "t"}\n\n{"id": "b", "text": "u"}\n', 2, "", "blank line"),
        (b'{"id": "a", "text": "t"}\n{"id": "b", \n', 2, "", "invalid JSON"),
        (b'{"id": "a", "text": NaN}\n', 1, "", "invalid JSON"),
        (b'["a", "t"]\n', 1, "", "expected a JSON object"),
        (b'{"id": "a", "text": "\xff"}\n', 1, "", "not valid UTF-8"),
        (_jsonl({"id": "a" * 501, "text": "t"}), 1, "id", "longer than 500"),
    ],
)
def test_errors_name_line_and_field(body: bytes, line: int, field: str, message: str) -> None:
    with pytest.raises(DatasetError) as err:
        parse_text_jsonl(body)
    assert message in str(err.value)
    assert str(err.value).startswith(f"line {line}")
    (entry,) = err.value.errors
    assert (entry["line"], entry["field"]) == (line, field) and message in str(err.value)
    if field:
        assert f"field {field!r}" in str(err.value)


def test_size_bounds() -> None:
    with pytest.raises(DatasetError, match="no records"):
        parse_text_jsonl(b"")
    with pytest.raises(DatasetError, match="more than 2 records"):
        parse_text_jsonl(_jsonl(*({"id": str(i), "text": "t"} for i in range(3))), max_records=2)
    with pytest.raises(DatasetError, match="line 1, field 'text': longer than 10 characters"):
        parse_text_jsonl(_jsonl({"id": "a", "text": "x" * 11}), max_field_chars=10)
    with pytest.raises(DatasetError, match="line 2: longer than 64 bytes"):
        parse_text_jsonl(
            _jsonl({"id": "a", "text": "t"}, {"id": "b", "text": "y" * 80}), max_line_bytes=64
        )
