"""Answers on the hot paths (poll a job, submit, cancel): the route's Out model validates and
serialises the view in one pydantic-core call, skipping FastAPI's encode-then-dump route
while answering with exactly the shape the OpenAPI document declares."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Response
from pydantic import BaseModel


def render(
    model: type[BaseModel],
    view: Mapping[str, Any],
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = model.model_validate(view).model_dump_json()
    return Response(body, status_code, headers, media_type="application/json")
