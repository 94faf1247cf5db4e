"""Architecture registry: built-ins, errors naming the culprit, meta-device state-dict checks."""

from __future__ import annotations

import textwrap

import pytest
import torch

from worker.imu.architectures import (
    UnknownArchitecture,
    available,
    build,
    check_state_dict,
    dtype_name,
)


def test_builtins_are_available_without_torchvision() -> None:
    names = available()
    assert names[:3] == ["mlp", "cnn", "resnet18_cifar"]


@pytest.mark.parametrize("side", [8, 28, 32])
def test_cnn_and_resnet_take_several_input_sizes(side: int) -> None:
    cnn = build("cnn", in_channels=1, num_classes=7, width=4)
    res = build("resnet18_cifar", num_classes=5, in_channels=3, width=4)
    assert cnn(torch.randn(2, 1, side, side)).shape == (2, 7)
    assert res(torch.randn(2, 3, side, side)).shape == (2, 5)


def test_mlp_flattens_images() -> None:
    model = build("mlp", in_features=64, hidden=[16, 8], num_classes=10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert [n for n, _ in model.named_parameters()][-2:] == ["fc.weight", "fc.bias"]


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(KeyError, match="resnet18_cifar"):
        build("resnet9000")
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'; available: mlp"):
        build("resnet9000")
    assert issubclass(UnknownArchitecture, KeyError)


@pytest.mark.parametrize(
    ("name", "kwargs", "named"),
    [
        ("mlp", {"in_features": 64, "hiden": [3]}, "hiden"),
        ("mlp", {"hidden": [3]}, "in_features"),
        ("mlp", {"in_features": 0}, "in_features"),
        ("mlp", {"in_features": 4, "hidden": [3, -1]}, r"hidden\[1\]"),
        ("mlp", {"in_features": 4, "hidden": [2] * 300}, "hidden has 300 entries"),
        ("mlp", {"in_features": 1 << 30}, "in_features"),
        ("cnn", {"width": 2.5}, "width"),
        ("cnn", {"batch_norm": "yes"}, "batch_norm"),
        ("resnet18_cifar", {"num_classes": True}, "num_classes"),
    ],
)
def test_bad_kwargs_are_named(name: str, kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build(name, **kwargs)


def test_check_state_dict_names_missing_unexpected_and_mismatched() -> None:
    sd = build("mlp", in_features=64, hidden=[16], num_classes=10).state_dict()
    meta = {k: (tuple(v.shape), "F32") for k, v in sd.items()}
    assert check_state_dict("mlp", {"in_features": 64, "hidden": [16]}, meta).ok

    del meta["fc.bias"]
    meta["fc.extra"] = ((3,), "F32")
    meta["body.1.weight"] = ((16, 63), "F32")
    meta["fc.weight"] = ((10, 16), "I64")
    res = check_state_dict("mlp", {"in_features": 64, "hidden": [16]}, meta)
    assert not res.ok
    assert res.missing == ["fc.bias"] and res.unexpected == ["fc.extra"]
    assert [(m.key, m.expected, m.got) for m in res.mismatched] == [
        ("body.1.weight", ((16, 64), "F32"), ((16, 63), "F32")),
        ("fc.weight", ((10, 16), "F32"), ((10, 16), "I64")),
    ]
    d = res.to_dict()
    assert d["ok"] is False and d["mismatched"][0]["expected"] == {
        "shape": [16, 64],
        "dtype": "F32",
    }
    assert "fc.bias" in res.describe() and "body.1.weight" in res.describe()


def test_float_precision_differences_are_accepted_and_tensors_work_as_meta() -> None:
    model = build("cnn", width=4, batch_norm=True)
    meta = {
        k: v.to(torch.float64) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    assert check_state_dict("cnn", {"width": 4, "batch_norm": True}, meta).ok
    res = check_state_dict(
        "cnn",
        {"width": 4, "batch_norm": True},
        {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in meta.items()},
    )
    assert res.ok
    # num_batches_tracked is int64: a float there is a mismatch, not a cast
    key = "features.1.num_batches_tracked"
    res = check_state_dict("cnn", {"width": 4, "batch_norm": True}, {**meta, key: ((), "F32")})
    assert [m.key for m in res.mismatched] == [key]


def test_check_uses_the_meta_device_for_huge_models() -> None:
    # ~2.8 G parameters: would need 11 GB if really allocated.
    meta = {"fc.weight": ((10, 4096), "F32")}
    res = check_state_dict(
        "mlp", {"in_features": 4096, "hidden": [4096] * 160, "num_classes": 10}, meta
    )
    assert "fc.bias" in res.missing and len(res.missing) == 321


def torchvision_resnet18_layout(num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """Keys and shapes of torchvision's resnet18 state dict, generated (no torchvision)."""
    sd: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{prefix}.{name}"] = torch.randn(c)
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    sd["conv1.weight"] = torch.randn(64, 3, 7, 7)
    bn("bn1", 64)
    cin = 64
    for i, cout in enumerate([64, 128, 256, 512], start=1):
        for b in range(2):
            p = f"layer{i}.{b}"
            c_in = cin if b == 0 else cout
            sd[f"{p}.conv1.weight"] = torch.randn(cout, c_in, 3, 3)
            bn(f"{p}.bn1", cout)
            sd[f"{p}.conv2.weight"] = torch.randn(cout, cout, 3, 3)
            bn(f"{p}.bn2", cout)
            if b == 0 and i > 1:
                sd[f"{p}.downsample.0.weight"] = torch.randn(cout, c_in, 1, 1)
                bn(f"{p}.downsample.1", cout)
        cin = cout
    sd["fc.weight"] = torch.randn(num_classes, 512)
    sd["fc.bias"] = torch.randn(num_classes)
    return sd


def test_torchvision_resnet18_state_dict_loads_where_shapes_allow() -> None:
    tv = torchvision_resnet18_layout(1000)
    same_head = check_state_dict("resnet18_cifar", {"num_classes": 1000}, tv)
    assert same_head.missing == [] and same_head.unexpected == []
    assert [m.key for m in same_head.mismatched] == ["conv1.weight"]  # 7x7 stem vs 3x3

    res = check_state_dict("resnet18_cifar", {"num_classes": 10}, tv)
    bad = {m.key for m in res.mismatched}
    assert bad == {"conv1.weight", "fc.weight", "fc.bias"}

    model = build("resnet18_cifar", num_classes=10)
    out = model.load_state_dict({k: v for k, v in tv.items() if k not in bad}, strict=False)
    assert sorted(out.missing_keys) == sorted(bad) and out.unexpected_keys == []
    assert torch.equal(model.layer3[0].downsample[0].weight, tv["layer3.0.downsample.0.weight"])


def test_third_party_entry_point(tmp_path, monkeypatch) -> None:
    (tmp_path / "lethe_ext_demo.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def tiny(num_classes=3):
            return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))
    """)
    )
    dist = tmp_path / "lethe_ext_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lethe-ext-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lethe.architectures]\ntiny = lethe_ext_demo:tiny\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tiny" in available()
    model = build("tiny", num_classes=5)
    assert model(torch.randn(2, 4)).shape == (2, 5)
    with pytest.raises(ValueError, match="colour"):
        build("tiny", colour="red")
    assert check_state_dict(
        "tiny", {"num_classes": 5}, {"1.weight": ((5, 4), "F32"), "1.bias": ((5,), "F32")}
    ).ok
