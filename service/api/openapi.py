"""The OpenAPI document as a contract: stable operation ids and the shared components.

- operationId is `{tag}-{action}`: the tag's slug and the route function's name without the
  tag's own words (`list_jobs` under `jobs` → `jobs-list`), so generated clients keep their
  method names when paths or FastAPI change.
- Components that no response model reaches are added here: `Problem` (every error response
  refers to it), the typed request params (`IMUParams`, `GAParams`, `PolicyOverrides`),
  which are derived from the engine's configs in service.domain.params, and the training
  recipes a registration's `spec.recipe` takes (`TrainingRecipe`, `LMTrainingRecipe`).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.domain.lm_recipe import LMRecipeIn
from service.domain.models import RecipeIn
from service.domain.params import PolicyOverrides, param_models
from service.errors import Problem


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def operation_id(route: APIRoute) -> str:
    tag = _slug(str(route.tags[0])) if route.tags else "default"
    words = set(tag.split("-"))
    words |= {w[:-1] for w in words if w.endswith("s")}
    action = [w for w in route.name.split("_") if w not in words] or [route.name]
    return f"{tag}-{'-'.join(action)}"


def _components() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        Problem,
        PolicyOverrides,
        *param_models().values(),
        RecipeIn,
        LMRecipeIn,
    ]
    _, schema = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    defs = dict(schema.get("$defs", {}))
    for recipe in (RecipeIn, LMRecipeIn):  # named as documented (their titles); no $ref to them
        defs[str(recipe.model_config.get("title"))] = defs.pop(recipe.__name__)
    return defs


def install_openapi(app: FastAPI) -> None:
    """Replace `app.openapi` with one that adds the shared components (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(_components())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
