"""Refuse strings the databases cannot store, at the boundary, naming the field.

PostgreSQL's `text` and `jsonb` reject U+0000, and lone surrogates (U+D800–U+DFFF, which JSON
`\\ud800` escapes decode to) cannot be encoded as UTF-8 by any driver. SQLite stores both,
so without this check the same request would succeed on one database and be a 500 on the
other. One dependency on the application checks path, query, JSON and form values of every
route (`service.api.deps.check_request_strings`); nested JSON (the `spec` form field) is
checked where it is parsed.
"""

from __future__ import annotations

import re
from typing import Any

from service.errors import Invalid

_BAD = re.compile("[\x00\ud800-\udfff]")
_MAX_REPORTED = 20


def bad_char(text: str) -> str | None:
    """A description of the first unstorable character in `text`, or None."""
    match = _BAD.search(text)
    if match is None:
        return None
    return f"contains U+{ord(match.group()):04X}, which cannot be stored"


def find_bad(value: Any, field: str, where: str, out: list[dict[str, Any]]) -> None:
    """Append one error per unstorable string in `value` (keys included), walking JSON."""
    if len(out) >= _MAX_REPORTED:
        return
    if isinstance(value, str):
        reason = bad_char(value)
        if reason:
            out.append({"field": field, "in": where, "message": reason})
    elif isinstance(value, dict):
        for key, item in value.items():
            name = f"{field}.{key}" if field else str(key)
            why = bad_char(key) if isinstance(key, str) else None
            if why:
                out.append({"field": name, "in": where, "message": "key " + why})
            find_bad(item, name, where, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            find_bad(item, f"{field}.{i}" if field else str(i), where, out)


def problem(errors: list[dict[str, Any]]) -> Invalid:
    fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
    return Invalid(
        "validation-error",
        f"unstorable characters (NUL or lone surrogates) in: {fields}",
        title="Invalid input",
        errors=errors,
    )


def check_json(value: Any, field: str, where: str = "body") -> None:
    errors: list[dict[str, Any]] = []
    find_bad(value, field, where, errors)
    if errors:
        raise problem(errors)
