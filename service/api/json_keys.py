"""Refuse JSON bodies that name a key twice: parsers keep the last value, and two readers of
one body (a proxy that logs it, the service that acts on it) may then disagree on what was
asked. Used on the deletion-request route, where the body is the instruction."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from service.errors import validation


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


async def unique_json_keys(request: Request) -> None:
    """A 422 naming the repeated key; other JSON errors are the body parser's to report."""
    raw = await request.body()
    try:
        json.loads(raw, object_pairs_hook=_pairs)
    except _Duplicate as dup:
        raise validation(
            f"the JSON body names the key {dup.key!r} more than once",
            [{"field": f"body.{dup.key}", "message": "duplicate key"}],
        ) from None
    except ValueError:
        return
