"""Opaque keyset cursors: base64url of a JSON list of the last item's sort values."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from service.errors import Invalid

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
        raise _malformed()
    return values


def _malformed() -> Invalid:
    return Invalid(
        "invalid-cursor",
        "the cursor is not one this list produced",
        title="Invalid cursor",
        errors=[{"field": "cursor", "message": "malformed"}],
    )


def int_cursor(cursor: str | None) -> int | None:
    """A cursor holding one integer sort key (a submission sequence, an audit seq)."""
    values = decode_cursor(cursor, 1)
    if values is None:
        return None
    if isinstance(values[0], bool) or not isinstance(values[0], int):
        raise _malformed()
    return values[0]


def page(items: list[Any], limit: int, key: Any) -> tuple[list[Any], str | None]:
    """Trim a `limit + 1` query result to `limit` and build the next cursor from the last item."""
    if len(items) > limit:
        items = items[:limit]
        return items, encode_cursor(key(items[-1]))
    return items, None


def newest_first(query: Any, created: Any, ident: Any, cursor: str | None) -> Any:
    """Order ``query`` newest first by (created, id) and start after ``cursor``'s item.

    Lists across models order by creation time: positions in a line (submitted_seq) are per
    model since submissions stopped sharing one installation counter."""
    values = decode_cursor(cursor, 2)
    if values is not None:
        if not all(isinstance(v, str) for v in values):
            raise _malformed()
        try:
            at = datetime.fromisoformat(values[0].replace("Z", "+00:00"))
        except ValueError:
            raise _malformed() from None
        query = query.where((created < at) | ((created == at) & (ident < values[1])))
    return query.order_by(created.desc(), ident.desc())


def time_id_key(created: datetime, ident: str) -> list[str]:
    return [created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), ident]
