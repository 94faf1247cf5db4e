"""Typed request params: pydantic models of the IMU and GA engine settings and the policy.

The engine's own configs (`IMUConfig`, `GAConfig`, `LMUnlearnConfig`: dataclasses whose every
field is a `setting` with its description, default and bounds) are the single source: the
pydantic models here are built from those specs (through `service.engine.param_fields`), so the
OpenAPI document, the CLI's `--params` help and the submission check all say the same thing
without a second hand-written list. `PolicyOverrides` is the release policy's
per-request overrides (`params.policy`).

Submission validates the params with these models (422 naming `params.<field>`), then lets the
engine config check what one field alone cannot say (fields the calibration chooses).
"""

from __future__ import annotations

import json
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, create_model

from service import engine
from service.domain.lm_registration import is_lm
from service.errors import validation

if TYPE_CHECKING:
    from service.engine import Spec

# Engine fields the server controls (device placement is an operator decision).
SERVER_ONLY_PARAMS = ("device",)


Threshold = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]


class PolicyOverrides(BaseModel):
    """Per-request overrides of the release policy (`LETHE_POLICY_*` otherwise)."""

    model_config = ConfigDict(extra="forbid", title="PolicyOverrides")

    max_eval_acc_drop: Threshold | None = Field(
        default=None,
        description="Largest eval-accuracy drop that is released automatically.",
    )
    max_forget_acc: Threshold | None = Field(
        default=None,
        description="Class-wise forget sets: largest forget accuracy after.",
    )
    max_forget_auc_excess: Threshold | None = Field(
        default=None,
        description="Language models: allowed min-k AUC distance from 0.5 beyond its 2·SE "
        "limit (either side).",
    )
    max_false_release_rate: (
        Annotated[float, Field(gt=0.0, le=0.5, strict=True, allow_inf_nan=False)] | None
    ) = Field(
        default=None,
        description="Classifiers: largest chance that records the model still remembers "
        "pass the membership test as forgotten.",
    )
    max_membership_advantage: (
        Annotated[float, Field(ge=0.0, le=0.5, strict=True, allow_inf_nan=False)] | None
    ) = Field(
        default=None,
        description="Classifiers: largest remembered-vs-unseen distance at which the model "
        "shows no membership signal (an unchanged model is then released).",
    )
    membership_band: (
        Annotated[float, Field(gt=0.0, le=0.5, strict=True, allow_inf_nan=False)] | None
    ) = Field(
        default=None,
        description="Classifiers: two-sided level of the membership test's non-member band.",
    )
    mode: Literal["auto", "class", "random"] | None = Field(
        default=None,
        description="Which forgetting check applies; `auto` decides from the data.",
    )
    max_forget_recall: Threshold | None = Field(
        default=None,
        description="Language models: largest greedy exact recall of the forget set after.",
    )
    max_heldout_ppl_rise: Threshold | None = Field(
        default=None,
        description="Language models: largest relative rise of held-out perplexity.",
    )
    max_probe_recall_drop: Threshold | None = Field(
        default=None,
        description="Language models: largest relative loss of member-probe recall.",
    )
    require_review: StrictBool | None = Field(
        default=None,
        description="Always hold the result for a human decision.",
    )


_Name = Annotated[str, Field(min_length=1, pattern=r"\S")]


def _kind(spec: Spec) -> Any:
    """The pydantic type of an engine setting, from its spec's kind, bounds and choices."""
    bounds: dict[str, Any] = dict(spec.bounds)
    if spec.kind == "float":
        return Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]
    if spec.kind == "int":
        return Annotated[int, Field(strict=True, **bounds)]
    if spec.kind == "choice":
        return Literal[spec.choices]
    if spec.kind == "bool":
        return StrictBool
    if spec.kind == "names":
        return Annotated[list[_Name], Field(min_length=1)]
    return Annotated[str, Field(pattern=engine.DEVICE_RE.pattern)]


def describe(spec: Spec, default: Any) -> str:
    """A setting's description with what it accepts and its default, as the schema and the
    CLI's help show it."""
    accepts = ""
    if spec.kind in ("float", "int"):
        accepts = f" Range {spec.interval()}."
    elif spec.kind == "choice":
        accepts = " One of " + ", ".join(json.dumps(c) for c in spec.choices) + "."
    return f"{spec.help}{accepts} Default: {json.dumps(default)}."


def _field(default: Any, spec: Spec) -> tuple[Any, Any]:
    # null (or leaving the key out) keeps the engine's default, so the schema's `default` is
    # null; the engine's own is `x-engine-default`, where generated clients do not send it.
    return (
        _kind(spec) | None,
        Field(
            default=None,
            description=describe(spec, default),
            json_schema_extra={"x-engine-default": default},
        ),
    )


def _derived(name: str, config: type, doc: str, exclude: tuple[str, ...] = ()) -> type[BaseModel]:
    fields = {
        key: _field(default, spec)
        for key, default, spec in engine.param_fields(config)
        if key not in SERVER_ONLY_PARAMS and key not in exclude
    }
    fields["policy"] = (
        PolicyOverrides | None,
        Field(default=None, description="Release-policy overrides for this request."),
    )
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        name, __config__=ConfigDict(extra="forbid", title=name), __doc__=doc, **fields
    )
    return model


class RetrainParams(BaseModel):
    """Method `retrain`: the model's recipe decides everything; only the policy is open."""

    model_config = ConfigDict(extra="forbid", title="RetrainParams")

    policy: PolicyOverrides | None = Field(
        default=None, description="Release-policy overrides for this request."
    )


@cache
def param_models() -> dict[str, type[BaseModel]]:
    """`{"imu": IMUParams, "ga": GAParams, "lm": LMParams}`, built once from the engine
    configs (LMParams: either method on a `causal_lm` model)."""
    configs = engine.param_configs()
    return {
        "imu": _derived(
            "IMUParams",
            configs["imu"],
            "Overrides of the IMU settings (method `imu`); all optional.",
        ),
        "ga": _derived(
            "GAParams", configs["ga"], "Overrides of the gradient-ascent settings (method `ga`)."
        ),
        "retrain": RetrainParams,
        # `method` is the request's own field; `ascent_term` is the classifier loss (unused here).
        "lm": _derived(
            "LMParams",
            configs["lm"],
            "Overrides of the language-model settings (architecture `causal_lm`).",
            exclude=("method", "ascent_term"),
        ),
    }


def param_keys(method: str) -> list[str]:
    """The keys `params` accepts for a method (the CLI's help lists them)."""
    return list(param_models()[method].model_fields)


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        loc = ".".join(str(part) for part in e["loc"])
        out.append({"field": f"params.{loc}" if loc else "params", "message": e["msg"]})
    return out


def validate_params(method: str, params: Any, architecture: str | None = None) -> dict[str, Any]:
    """The overrides to store (only the keys given, not null); 422 naming `params.<field>`.
    A `causal_lm` model takes LMParams for either method."""
    if not isinstance(params, dict):
        raise validation("params must be an object", [{"field": "params", "message": "object"}])
    for key in SERVER_ONLY_PARAMS:
        if key in params:
            raise validation(
                f"params.{key} is set by the server (LETHE_DEVICE)",
                [{"field": f"params.{key}", "message": "not allowed"}],
            )
    lm = architecture is not None and is_lm(architecture)
    model = param_models()["lm" if lm and method != "retrain" else method]
    try:
        parsed = model.model_validate(params)
    except ValidationError as exc:
        errors = _errors(exc)
        accepted = ", ".join(model.model_fields)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise validation(
            f"invalid {method} params: {detail} (accepted: {accepted})", errors
        ) from None
    # null means "the default": only the values given are stored.
    stored: dict[str, Any] = parsed.model_dump(exclude_unset=True, exclude_none=True)
    policy = stored.pop("policy", None)
    if method != "retrain":
        _check_engine(method, stored, lm=lm)
    if policy is not None:
        stored["policy"] = policy
    return stored


def _check_engine(method: str, overrides: dict[str, Any], *, lm: bool = False) -> None:
    """What one field alone cannot say (e.g. `lr` is the calibration's unless it is off)."""
    try:
        if lm:
            engine.lm_config_for(method, overrides)
        else:
            engine.param_configs()[method].from_overrides(overrides)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as exc:
        head = str(exc).split(" ", 1)[0]
        field = head if head in overrides else None
        raise validation(
            f"invalid {method} params: {exc}",
            [{"field": f"params.{field}" if field else "params", "message": str(exc)}],
        ) from None
