"""Request params: pydantic models derived from the engine's configs (no second list)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import pytest
from pydantic import ValidationError

from service import engine
from service.domain import params as params_module
from service.domain.params import (
    SERVER_ONLY_PARAMS,
    PolicyOverrides,
    param_keys,
    param_models,
    validate_params,
)
from service.errors import Invalid
from worker.imu import GAConfig, IMUConfig
from worker.imu.lm_unlearn import LMUnlearnConfig
from worker.imu.settings import Spec

# The request models and the engine configs they are built from; LMParams drops what the
# request's own fields set (`method`) or LMs do not use (`ascent_term`).
MODELS = [
    ("imu", IMUConfig, ()),
    ("ga", GAConfig, ()),
    ("lm", LMUnlearnConfig, ("method", "ascent_term")),
]
SCHEMA_BOUNDS = {
    "ge": "minimum",
    "gt": "exclusiveMinimum",
    "le": "maximum",
    "lt": "exclusiveMaximum",
}
SCHEMA_TYPES = {"float": "number", "int": "integer", "choice": "string", "bool": "boolean"}


def engine_fields(config: type, exclude: tuple[str, ...]) -> list[tuple[str, Any, Spec]]:
    return [
        (name, default, rule)
        for name, default, rule in engine.param_fields(config)
        if name not in (*SERVER_ONLY_PARAMS, *exclude)
    ]


@pytest.mark.parametrize(("method", "config", "exclude"), MODELS)
def test_models_follow_the_engine_config(method: str, config: type, exclude: tuple) -> None:
    fields = [f.name for f in dataclasses.fields(config)]
    assert param_keys(method) == [
        *(f for f in fields if f not in (*SERVER_ONLY_PARAMS, *exclude)),
        "policy",
    ]
    schema = param_models()[method].model_json_schema()
    for name, default, rule in engine_fields(config, exclude):
        prop = schema["properties"][name]
        own, null = prop["anyOf"]
        assert null == {"type": "null"} and prop["default"] is None, name
        assert prop["x-engine-default"] == default, name
        assert prop["description"].startswith(rule.help), name
        assert prop["description"].endswith(f"Default: {json.dumps(default)}."), name
        keys = {SCHEMA_BOUNDS[op]: b for op, b in rule.bounds}
        assert {k: own[k] for k in SCHEMA_BOUNDS.values() if k in own} == keys, name
        if rule.kind == "names":
            assert (own["type"], own["minItems"]) == ("array", 1), name
        else:
            assert own["type"] == SCHEMA_TYPES[rule.kind], name
        assert own.get("enum", []) == list(rule.choices), name
        if rule.kind in ("float", "int"):
            assert f"Range {rule.interval()}." in prop["description"], name


def out_of_range(rule: Spec) -> Any:
    op, b = rule.bounds[-1]  # the upper bound
    return b + (1 if op == "le" else 0)


@pytest.mark.parametrize(("method", "config", "exclude"), MODELS)
def test_engine_and_api_name_the_same_field(method: str, config: type, exclude: tuple) -> None:
    model = param_models()[method]
    for name, _, rule in engine_fields(config, exclude):
        if rule.kind in ("float", "int"):
            bad: Any = out_of_range(rule)
        elif rule.kind == "choice":
            bad = "nonsense"
        else:
            continue
        with pytest.raises(ValueError) as engine_error:
            config(**{"calibration": "off", name: bad})
        assert str(engine_error.value).split(" ", 1)[0] == name
        with pytest.raises(ValidationError) as api_error:
            model.model_validate({name: bad})
        assert {e["loc"][0] for e in api_error.value.errors()} == {name}
        architecture = "causal_lm" if method == "lm" else None
        with pytest.raises(Invalid) as problem:
            validate_params("imu" if method == "lm" else method, {name: bad}, architecture)
        assert [e["field"] for e in problem.value.errors or []] == [f"params.{name}"]


def test_the_models_are_built_from_the_specs_alone() -> None:
    assert not hasattr(params_module, "_descriptions") and not hasattr(params_module, "_HELP")
    source = inspect.getsource(params_module)
    assert "import re" not in source and ".__doc__" not in source  # no docstring parsing


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("imu", {"top_data": 0.0}, "params.top_data"),  # (0, 1]
        ("imu", {"top_data": True}, "params.top_data"),  # a bool is not a number
        ("imu", {"epochs": 2.5, "calibration": "off"}, "params.epochs"),
        ("imu", {"train_mode": False}, "params.train_mode"),  # a GA setting
        ("ga", {"top_data": 0.5}, "params.top_data"),  # an IMU setting
        ("imu", {"backbone_mode": "frozen"}, "params.backbone_mode"),
        ("imu", {"params": []}, "params.params"),
        ("imu", {"device": "cuda"}, "params.device"),  # the operator's decision
        ("imu", {"alpha": 0.5}, "params.alpha"),  # the calibration's to choose
        ("imu", {"policy": {"max_forget_acc": 2}}, "params.policy.max_forget_acc"),
        ("imu", {"policy": {"require_review": 1}}, "params.policy.require_review"),
    ],
)
def test_invalid_params_name_their_field(method: str, params: dict, field: str) -> None:
    with pytest.raises(Invalid) as problem:
        validate_params(method, params)
    assert [e["field"] for e in problem.value.errors or []] == [field]


def test_only_given_values_are_stored() -> None:
    given = {"calibration": "off", "epochs": 3, "top_data": None, "policy": {"mode": "class"}}
    assert validate_params("imu", given) == {
        "calibration": "off",
        "epochs": 3,
        "policy": {"mode": "class"},
    }
    assert validate_params("ga", {}) == {}
    assert list(PolicyOverrides.model_fields) == [
        "max_eval_acc_drop",
        "max_forget_acc",
        "max_forget_auc_excess",
        "max_false_release_rate",
        "max_membership_advantage",
        "membership_band",
        "mode",
        "max_forget_recall",
        "max_heldout_ppl_rise",
        "max_probe_recall_drop",
        "require_review",
    ]
