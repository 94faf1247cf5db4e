"""Opaque keyset cursors: base64url of a JSON list of the last item's sort values."""

from __future__ import annotations

import base64
import json
from typing import Any

from service.api.problems import Problem

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


def encode_cursor(values: list[Any]) -> str:
    raw = json.dumps(values, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, arity: int) -> list[Any] | None:
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError):
        values = None
    if not isinstance(values, list) or len(values) != arity:
        raise Problem(
            422,
            "invalid-cursor",
            "the cursor is not one this list produced",
            title="Invalid cursor",
            errors=[{"field": "cursor", "message": "malformed"}],
        )
    return values


def page(items: list[Any], limit: int, key: Any) -> tuple[list[Any], str | None]:
    """Trim a `limit + 1` query result to `limit` and build the next cursor from the last item."""
    if len(items) > limit:
        items = items[:limit]
        return items, encode_cursor(key(items[-1]))
    return items, None
