"""IMUConfig: defaults, bounds naming the field, overrides as a service would send them."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.imu import IMUConfig, resolve_device


def test_defaults_are_the_authors_values() -> None:
    cfg = IMUConfig()
    assert (cfg.clip_quantile, cfg.damping, cfg.alpha) == (0.93, 0.01, 0.2)
    # top_data unset: the authors' 0.1 with calibration off, every record with it on.
    off = IMUConfig(calibration="off")
    assert (off.resolved_top_data, off.selects_all) == (0.1, False)
    assert (cfg.resolved_top_data, cfg.selects_all) == (1.0, True)
    assert IMUConfig(top_data=0.3).selects_all is False
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.momentum) == (0.01, 10, 256, 0.9)
    assert cfg.weight_decay == 5e-4 and cfg.params is None and cfg.backbone_mode == "train"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_data", 0.0),
        ("top_data", 1.01),
        ("clip_quantile", -0.1),
        ("damping", 0.0),
        ("alpha", -1.0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("epochs", 0),
        ("epochs", 2.5),
        ("batch_size", True),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("seed", -1),
        ("backbone_mode", "frozen"),
        ("device", "tpu"),
        ("params", []),
        ("params", [""]),
        ("params", [3]),
        ("top_data", "0.1"),
    ],
)
def test_out_of_range_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        IMUConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        IMUConfig.from_overrides({field: value})


def test_from_overrides_rejects_unknown_keys_and_applies_known_ones() -> None:
    with pytest.raises(ValueError, match="'learning_rate'"):
        IMUConfig.from_overrides({"learning_rate": 0.1})
    cfg = IMUConfig.from_overrides({"epochs": 3, "lr": 1, "params": "fc", "calibration": "off"})
    assert cfg.epochs == 3 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.params == ["fc"]
    base = IMUConfig(top_data=0.5)
    assert IMUConfig.from_overrides({"top_data": 0.2}, base=base).clip_quantile == 0.93
    assert IMUConfig.from_overrides({"seed": 2}, base=base).top_data == 0.5
    assert IMUConfig.from_overrides(None) == IMUConfig()


def test_to_dict_is_plain_json_and_round_trips() -> None:
    cfg = IMUConfig(params=["layer4", "fc"], backbone_mode="train", device="cpu", seed=3)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert IMUConfig.from_overrides(data) == cfg


def test_device_resolution() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert IMUConfig().resolved_device().type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_integral_floats_are_accepted_for_integer_fields() -> None:
    cfg = IMUConfig.from_overrides({"epochs": 3.0, "batch_size": 64.0, "calibration": "off"})
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    with pytest.raises(ValueError, match="lr is out of range"):
        IMUConfig.from_overrides({"lr": 10**400, "calibration": "off"})


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from([*IMUConfig.field_names(), "x"]), _json, max_size=4))
def test_fuzz_overrides_either_validate_or_raise_value_error(overrides: dict) -> None:
    try:
        cfg = IMUConfig.from_overrides(overrides)
    except ValueError:
        return
    assert IMUConfig.from_overrides(cfg.to_dict()) == cfg
