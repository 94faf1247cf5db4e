"""Refuse strings the databases cannot store, at the boundary, naming the field.

PostgreSQL's `text` and `jsonb` reject U+0000, and lone surrogates (U+D800–U+DFFF, which JSON
`\\ud800` escapes decode to) cannot be encoded as UTF-8 by any driver. SQLite stores both,
so without this check the same request would succeed on one database and be a 500 on the
other. One dependency on the application checks path, query, JSON and form values of every
route; nested JSON (the `spec` form field) is checked where it is parsed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from service.api.problems import Problem

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


def problem(errors: list[dict[str, Any]]) -> Problem:
    fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
    return Problem(
        422,
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


async def check_request_strings(request: Request) -> None:
    """App-wide dependency: runs before each route's own dependencies (auth included)."""
    errors: list[dict[str, Any]] = []
    for name, value in request.path_params.items():
        if isinstance(value, str):
            find_bad(value, name, "path", errors)
    for name, value in request.query_params.multi_items():
        find_bad(name, name, "query", errors)
        find_bad(value, name, "query", errors)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        body = await request.body()  # cached on the request: FastAPI parses the same bytes
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            parsed = None  # FastAPI answers malformed JSON itself (422)
        find_bad(parsed, "", "body", errors)
    elif content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        for name, value in form.multi_items():
            find_bad(name, name, "body", errors)
            if isinstance(value, UploadFile):
                if value.filename:
                    find_bad(value.filename, f"{name}.filename", "body", errors)
            else:
                find_bad(value, name, "body", errors)
    if errors:
        raise problem(errors)
