"""Request params: pydantic models derived from the engine's configs (no second list)."""

from __future__ import annotations

import dataclasses

import pytest

from service.domain.params import PolicyOverrides, param_keys, param_models, validate_params
from service.errors import Invalid
from worker.imu import GAConfig, IMUConfig


@pytest.mark.parametrize(("method", "config"), [("imu", IMUConfig), ("ga", GAConfig)])
def test_models_follow_the_engine_config(method: str, config: type) -> None:
    fields = [f.name for f in dataclasses.fields(config) if f.name != "device"]
    assert param_keys(method) == [*fields, "policy"]
    schema = param_models()[method].model_json_schema()
    for name, (low, high, low_inc, high_inc) in config._FLOAT_BOUNDS.items():
        bound = schema["properties"][name]["anyOf"][0]
        assert bound["minimum" if low_inc else "exclusiveMinimum"] == low
        assert bound["maximum" if high_inc else "exclusiveMaximum"] == high
    for name, (low_i, high_i) in config._INT_BOUNDS.items():
        bound = schema["properties"][name]["anyOf"][0]
        assert (bound["type"], bound["minimum"], bound["maximum"]) == ("integer", low_i, high_i)
    assert all(p["description"] for p in schema["properties"].values())


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
