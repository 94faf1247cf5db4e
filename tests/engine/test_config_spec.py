"""Every config field declares its description and bounds once, in its `setting`, and the
configs check exactly those bounds."""

from __future__ import annotations

import dataclasses

import pytest

from worker.imu.config import GAConfig, IMUConfig, StepConfig
from worker.imu.lm_unlearn import LMUnlearnConfig
from worker.imu.settings import Spec, setting, spec, specs

CONFIGS = [StepConfig, IMUConfig, GAConfig, LMUnlearnConfig]


def outside(rule: Spec) -> list[float]:
    """Values just past each bound of a numeric spec."""
    step = 1 if rule.kind == "int" else 1.0
    values = []
    for op, b in rule.bounds:
        values.append({"gt": b, "ge": b - step, "lt": b, "le": b + step}[op])
    return values


def inside(rule: Spec) -> list[float]:
    """The inclusive bounds themselves."""
    return [b for op, b in rule.bounds if op in ("ge", "le")]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_field_declares_a_description_and_its_bounds(config: type) -> None:
    for f, rule in specs(config):
        assert rule.help.strip() and rule.help == rule.help.strip(), f.name
        if rule.kind in ("float", "int"):
            lower = [op for op, _ in rule.bounds if op in ("ge", "gt")]
            upper = [op for op, _ in rule.bounds if op in ("le", "lt")]
            assert len(lower) == len(upper) == 1, f.name
        if rule.kind == "choice":
            assert f.default in rule.choices, f.name
    for old in ("_FLOAT_BOUNDS", "_INT_BOUNDS", "_CHOICES"):
        assert not hasattr(config, old)


@pytest.mark.parametrize("config", CONFIGS)
def test_validation_follows_the_metadata(config: type) -> None:
    base = {"calibration": "off"}
    for f, rule in specs(config):
        if rule.kind == "choice":
            with pytest.raises(ValueError, match=rf"^{f.name} must be one of"):
                config(**{**base, f.name: "nonsense"})
            for choice in rule.choices:
                assert getattr(config(**{**base, f.name: choice}), f.name) == choice
        if rule.kind not in ("float", "int"):
            continue
        for value in outside(rule):
            with pytest.raises(ValueError, match=rf"^{f.name} must be in "):
                config(**{**base, f.name: value})
        for value in inside(rule):
            assert getattr(config(**{**base, f.name: value}), f.name) == value
        if rule.nullable:
            assert getattr(config(**{**base, f.name: None}), f.name) is None
        else:
            with pytest.raises(ValueError, match=rf"^{f.name} must be"):
                config(**{**base, f.name: None})


def test_error_messages_keep_their_style() -> None:
    with pytest.raises(ValueError, match=r"^lr must be in \(0\.0, 10\.0\], got 20$"):
        IMUConfig(lr=20, calibration="off")
    with pytest.raises(ValueError, match=r"^epochs must be in \[1, 10000\], got 0$"):
        IMUConfig(epochs=0)
    with pytest.raises(ValueError, match=r"^backbone_mode must be one of \['train', 'eval'\]"):
        IMUConfig(backbone_mode="frozen")
    with pytest.raises(ValueError, match="^train_mode must be true or false, got 1$"):
        GAConfig(train_mode=1)
    with pytest.raises(ValueError, match="^lora_targets must be null or a non-empty list of"):
        LMUnlearnConfig(lora_targets=[])


def test_shared_settings_are_one_spec() -> None:
    """The IMU settings the language-model config shares keep IMUConfig's bounds."""
    imu = {f.name: rule for f, rule in specs(IMUConfig)}
    lm = {f.name: rule for f, rule in specs(LMUnlearnConfig)}
    for name in ("top_data", "clip_quantile", "damping", "l1_scale", "batch_size"):
        assert (lm[name].kind, lm[name].bounds) == (imu[name].kind, imu[name].bounds), name
    lm_defaults = {f.name: f.default for f in dataclasses.fields(LMUnlearnConfig)}
    assert (lm_defaults["top_data"], lm_defaults["batch_size"]) == (1.0, 8)
    assert LMUnlearnConfig().guard_max_drop == 0.03 and IMUConfig().guard_max_drop is None


def test_a_setting_states_a_whole_range() -> None:
    with pytest.raises(TypeError, match="one lower and one upper bound"):
        setting(1.0, help="x", gt=0.0)
    with pytest.raises(TypeError, match="takes no bounds"):
        setting(True, help="x", ge=0)
    with pytest.raises(TypeError, match="choices go with kind 'choice'"):
        spec("names", help="x", choices=("a",))
    with pytest.raises(TypeError, match="name the kind"):
        setting(None, help="x")
    assert spec("float", help="x", ge=0, le=1).bounds == (("ge", 0.0), ("le", 1.0))


def test_a_field_without_a_setting_is_named() -> None:
    @dataclasses.dataclass
    class Loose(StepConfig):
        extra: int = 3

    with pytest.raises(TypeError, match="extra is declared without setting"):
        Loose()
