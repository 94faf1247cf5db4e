"""Architecture registry: names -> constructors returning ``nn.Module``.

Built in (no torchvision needed): ``mlp``, ``cnn``, ``resnet18_cifar``. When torchvision is
importable its classifiers are offered as ``torchvision.<name>`` (e.g. ``torchvision.resnet50``).
Third parties register constructors through the entry-point group ``lethe.architectures``;
the entry point's name is the architecture name and its object a callable returning a module.

``check_state_dict`` builds the architecture on the ``meta`` device (no memory, no compute)
and compares its state dict with a checkpoint's header, so a registration can be refused
before any tensor is read.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import nn

ENTRY_POINT_GROUP = "lethe.architectures"
TORCHVISION_PREFIX = "torchvision."

# safetensors header dtype names <-> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors header name of a torch dtype (e.g. ``torch.float32`` -> ``"F32"``)."""
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors name") from None


# --------------------------------------------------------------------------- validation


# Upper bounds keep a hostile registration (kwargs come from requests) from building
# millions of modules, even on the meta device.
MAX_DIM = 1 << 24
MAX_LAYERS = 256


def _positive_int(name: str, value: Any, upper: int = MAX_DIM) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{name} must be an integer in [1, {upper}], got {value!r}")
    return value


def _positive_ints(name: str, value: Any) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {value!r}")
    if len(value) > MAX_LAYERS:
        raise ValueError(f"{name} has {len(value)} entries, at most {MAX_LAYERS} are allowed")
    return [_positive_int(f"{name}[{i}]", v) for i, v in enumerate(value)]


# --------------------------------------------------------------------------- built-ins


class MLP(nn.Module):
    """Flatten -> (Linear, ReLU)* -> Linear ``fc`` producing the logits."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def mlp(in_features: int, hidden: Sequence[int] = (256,), num_classes: int = 10) -> nn.Module:
    return MLP(
        _positive_int("in_features", in_features),
        _positive_ints("hidden", hidden),
        _positive_int("num_classes", num_classes),
    )


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks, one 2x2 max-pool, adaptive pooling to 2x2, Linear ``fc``.

    Padding keeps the spatial size, and the adaptive pool makes the head independent of
    it, so the same network takes 8x8 (sklearn digits), 28x28 (MNIST) and 32x32 (CIFAR).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, batch_norm: bool) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def cnn(
    in_channels: int = 1, num_classes: int = 10, width: int = 32, batch_norm: bool = False
) -> nn.Module:
    if not isinstance(batch_norm, bool):
        raise ValueError(f"batch_norm must be true or false, got {batch_norm!r}")
    return SmallCNN(
        _positive_int("in_channels", in_channels),
        _positive_int("num_classes", num_classes),
        _positive_int("width", width),
        batch_norm,
    )


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, same parameter names (conv1, bn1, ..., downsample)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet18Cifar(nn.Module):
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (the usual CIFAR variant).

    Parameter names follow torchvision's ``resnet18`` (conv1, bn1, layer1.0.conv1, ..., fc),
    so torchvision checkpoints load wherever the shapes agree (all but conv1 and, for a
    different class count, fc).
    """

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        channels = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, cout in enumerate(channels):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
            self.add_module(f"layer{i + 1}", layer)
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        # The stages are registered by name in __init__; getattr keeps their names stable.
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    return ResNet18Cifar(
        _positive_int("num_classes", num_classes),
        _positive_int("in_channels", in_channels),
        _positive_int("width", width),
    )


BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18_cifar": resnet18_cifar,
}


# --------------------------------------------------------------------------- torchvision


def _torchvision_models() -> Any | None:
    try:
        import torchvision.models as tvm  # noqa: PLC0415 - optional extra
    except Exception:  # noqa: BLE001 - a broken optional install must not break the registry
        return None
    return tvm


def _torchvision_names() -> list[str]:
    tvm = _torchvision_models()
    if tvm is None:
        return []
    try:
        names = tvm.list_models(module=tvm)  # classification models only
    except Exception:  # noqa: BLE001
        return []
    return [TORCHVISION_PREFIX + n for n in sorted(names)]


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    tvm = _torchvision_models()
    if tvm is None:
        raise ValueError(f"architecture {name!r} needs torchvision, which is not installed")
    short = name[len(TORCHVISION_PREFIX) :]

    def build_tv(cifar_stem: bool = False, **kwargs: Any) -> nn.Module:
        # Never download weights: checkpoints come from the registration, not the internet.
        if kwargs.get("weights") is not None:
            raise ValueError("weights must not be set: checkpoints are registered, not fetched")
        model = tvm.get_model(short, weights=None, **kwargs)
        if cifar_stem:
            _apply_cifar_stem(model, short)
        return model

    return build_tv


def _apply_cifar_stem(model: nn.Module, short: str) -> None:
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(f"cifar_stem is only supported for ResNet-style models, not {short}")
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


# --------------------------------------------------------------------------- entry points


def _entry_points() -> dict[str, metadata.EntryPoint]:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - broken distributions must not break the registry
        return {}
    return {ep.name: ep for ep in eps}


# --------------------------------------------------------------------------- public API


class UnknownArchitecture(KeyError, ValueError):
    """Unknown name; both a KeyError (registry lookup) and a ValueError (bad request)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def available() -> list[str]:
    """All architecture names: built-ins, entry points, then torchvision classifiers."""
    names = list(BUILTINS)
    names += sorted(n for n in _entry_points() if n not in BUILTINS)
    names += _torchvision_names()
    return names


def _constructor(name: str) -> Callable[..., nn.Module]:
    if not isinstance(name, str):
        raise ValueError(f"architecture name must be a string, got {name!r}")
    if name in BUILTINS:
        return BUILTINS[name]
    eps = _entry_points()
    if name in eps:
        obj = eps[name].load()
        if not callable(obj):
            raise ValueError(f"entry point {name!r} in {ENTRY_POINT_GROUP} is not callable")
        return obj
    if name.startswith(TORCHVISION_PREFIX) and name in _torchvision_names():
        return _torchvision_builder(name)
    raise UnknownArchitecture(f"unknown architecture {name!r}; available: {', '.join(available())}")


def _check_kwargs(name: str, ctor: Callable[..., nn.Module], kwargs: Mapping[str, Any]) -> None:
    """Turn a wrong keyword into a ValueError naming it (instead of a TypeError deep inside)."""
    try:
        sig = inspect.signature(ctor)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    for key in kwargs:
        if key not in accepted:
            raise ValueError(
                f"architecture {name!r} has no argument {key!r}; accepted: {sorted(accepted)}"
            )
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        missing = [
            p.name
            for p in params
            if p.default is inspect.Parameter.empty
            and p.kind is not inspect.Parameter.VAR_POSITIONAL
            and p.name not in kwargs
        ]
        raise ValueError(
            f"architecture {name!r}: missing argument {', '.join(map(repr, missing))}"
            if missing
            else f"architecture {name!r}: {exc}"
        ) from None


def build(name: str, **kwargs: Any) -> nn.Module:
    """Construct architecture ``name`` with ``kwargs``.

    Unknown name -> UnknownArchitecture (a KeyError and a ValueError) listing the available
    names; a wrong or missing keyword, or an out-of-range value -> ValueError naming it.
    """
    ctor = _constructor(name)
    _check_kwargs(name, ctor, kwargs)
    try:
        model = ctor(**kwargs)
    except TypeError as exc:  # a constructor's own type complaint is a bad argument
        raise ValueError(f"architecture {name!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"architecture {name!r} did not return an nn.Module")
    return model


@dataclass
class Mismatch:
    key: str
    expected: tuple[tuple[int, ...], str]  # (shape, safetensors dtype name)
    got: tuple[tuple[int, ...], str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "expected": {"shape": list(self.expected[0]), "dtype": self.expected[1]},
            "got": {"shape": list(self.got[0]), "dtype": self.got[1]},
        }


@dataclass
class StateDictCheck:
    """Outcome of comparing a checkpoint's tensors with an architecture's state dict."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [m.to_dict() for m in self.mismatched],
        }

    def describe(self, limit: int = 10) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing keys: {', '.join(self.missing[:limit])}")
        if self.unexpected:
            parts.append(f"unexpected keys: {', '.join(self.unexpected[:limit])}")
        if self.mismatched:
            shown = [
                f"{m.key} (expected {list(m.expected[0])} {m.expected[1]}, "
                f"got {list(m.got[0])} {m.got[1]})"
                for m in self.mismatched[:limit]
            ]
            parts.append(f"mismatched: {', '.join(shown)}")
        return "; ".join(parts) if parts else "ok"


def _meta_of(key: str, value: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), dtype_name(value.dtype)
    try:
        shape, dtype = value
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"tensor {key!r}: expected (shape, dtype), got {value!r}") from None
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {key!r}: unknown dtype {dtype!r}")
    return shape, dtype


def build_meta(name: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build ``name`` on the meta device: shapes and dtypes only, no storage."""
    with torch.device("meta"):
        return build(name, **dict(kwargs or {}))


def check_state_dict(
    name: str, kwargs: Mapping[str, Any] | None, tensors_meta: Mapping[str, Any]
) -> StateDictCheck:
    """Compare ``tensors_meta`` (key -> (shape, dtype name) or a tensor) with the state dict
    of ``build(name, **kwargs)``.

    A key is mismatched when its shape differs, or its dtype differs in kind (floating vs
    integer/bool): ``load_state_dict`` casts between float precisions, but an integer buffer
    filled from floats, or the reverse, is a broken checkpoint.
    """
    return compare_state_dict(build_meta(name, kwargs), tensors_meta)


def compare_state_dict(
    model: nn.Module, tensors_meta: Mapping[str, Any], optional: frozenset[str] = frozenset()
) -> StateDictCheck:
    """The comparison rule of ``check_state_dict`` against a built (meta) model; keys in
    ``optional`` may be absent (tied weights saved under one name)."""
    expected = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in model.state_dict().items()}
    got = {k: _meta_of(k, v) for k, v in tensors_meta.items()}
    result = StateDictCheck(
        missing=[k for k in expected if k not in got and k not in optional],
        unexpected=[k for k in got if k not in expected],
    )
    for key, exp in expected.items():
        if key not in got:
            continue
        have = got[key]
        exp_float = SAFETENSORS_DTYPES[exp[1]].is_floating_point
        have_float = SAFETENSORS_DTYPES[have[1]].is_floating_point
        if exp[0] != have[0] or exp_float != have_float:
            result.mismatched.append(Mismatch(key, exp, have))
    return result
