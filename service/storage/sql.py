"""Small SQL helpers shared by the API and the worker."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Executable
from sqlalchemy.orm import Session

T = TypeVar("T")

IN_CHUNK = 500  # values per IN (...) clause (SQLite caps bound parameters)


def chunked(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def affected_rows(
    session: Session,
    statement: Executable,
    params: dict[str, Any] | list[dict[str, Any]] | None = None,
) -> int:
    """Run an UPDATE/DELETE (an executemany when ``params`` is a list) and return how many
    rows it matched, in all."""
    return cast(CursorResult[Any], session.execute(statement, params)).rowcount
