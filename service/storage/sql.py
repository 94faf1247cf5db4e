"""Small SQL helpers shared by the API and the worker."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Executable, insert
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session

T = TypeVar("T")

IN_CHUNK = 500  # values per IN (...) clause (SQLite caps bound parameters)


def chunked(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def affected_rows(session: Session, statement: Executable) -> int:
    """Run an UPDATE/DELETE and return how many rows it matched."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def insert_rows(session: Session, objects: Sequence[Any]) -> None:
    """INSERT new ORM objects of one class, built alike, in one Core executemany. The unit of
    work's bookkeeping per object was most of a submission batch's final step; the objects
    stay out of the session (nothing tracks them afterwards)."""
    if not objects:
        return
    mapper = sa_inspect(type(objects[0]))
    first = vars(objects[0])
    # Columns an object leaves unset take their column default, row by row.
    columns = [(a.key, a.columns[0].key) for a in mapper.column_attrs if a.key in first]
    rows = [{column: getattr(obj, attr) for attr, column in columns} for obj in objects]
    session.execute(insert(mapper.local_table), rows)
