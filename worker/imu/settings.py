"""Declarative config fields: each setting states its description, default and bounds once.

``setting(0.01, help="...", gt=0.0, le=10.0)`` is a ``dataclasses.field`` whose metadata holds
a `Spec`; the configs' ``validate`` checks every field against its spec, and the service builds
its request models, OpenAPI schemas and CLI help from the same specs (through service.engine).
A setting two configs share is one module-level `Spec`, placed with ``spec.at(default)``.

torch-free on purpose, like `worker.imu.devices`: the service reads the specs without torch.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from worker.imu.devices import DEVICE_NAMES, DEVICE_RE

Kind = Literal["float", "int", "choice", "bool", "names", "device"]
SPEC = "lethe.spec"  # the metadata key of a field's Spec
_HOLDS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


@dataclass(frozen=True)
class Spec:
    """What a setting accepts. ``bounds`` uses pydantic's names (``ge``/``gt``/``le``/``lt``);
    ``nullable``: None is a valid value (chosen per request or mode); ``items``: what a
    ``names`` list holds, for its error message."""

    kind: Kind
    help: str
    bounds: tuple[tuple[str, float], ...] = ()
    choices: tuple[str, ...] = ()
    nullable: bool = False
    items: str = "names"

    def at(self, default: Any, *, help: str | None = None) -> Any:
        """A dataclass field with this spec and ``default``; ``help`` rewords it for one
        config (the bounds stay)."""
        spec = self if help is None else dataclasses.replace(self, help=help)
        if isinstance(default, list):  # a mutable default is a factory of copies
            return dataclasses.field(default_factory=default.copy, metadata={SPEC: spec})
        return dataclasses.field(default=default, metadata={SPEC: spec})

    def bound(self, name: str) -> float | None:
        return dict(self.bounds).get(name)

    def check(self, name: str, value: Any) -> Any:
        """``value`` as the config stores it; ValueError naming ``name`` when it is not one
        this spec accepts."""
        if value is None and self.nullable:
            return None
        if self.kind == "float":
            return self._checked_float(name, value)
        if self.kind == "int":
            return self._checked_int(name, value)
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{name} must be one of {list(self.choices)}, got {value!r}")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        elif self.kind == "names":
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) and v.strip() for v in value)
            ):
                raise ValueError(
                    f"{name} must be null or a non-empty list of {self.items}, got {value!r}"
                )
        elif not isinstance(value, str) or not DEVICE_RE.match(value):
            raise ValueError(f"{name} must be null or {DEVICE_NAMES}, got {value!r}")
        return value

    def _in_bounds(self, name: str, number: float, value: Any) -> None:
        if not all(_HOLDS[op](number, b) for op, b in self.bounds):
            raise ValueError(f"{name} must be in {self.interval()}, got {value!r}")

    def interval(self) -> str:
        """The bounds as an interval, ``(0.0, 10.0]``."""
        low = "[" if self.bound("ge") is not None else "("
        high = "]" if self.bound("le") is not None else ")"
        lo = self.bound("ge") if low == "[" else self.bound("gt")
        hi = self.bound("le") if high == "]" else self.bound("lt")
        return f"{low}{lo}, {hi}{high}"

    def _checked_float(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{name} is out of range, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {value!r}")
        self._in_bounds(name, number, value)
        return number

    def _checked_int(self, name: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON clients may send 10.0
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        self._in_bounds(name, value, value)
        return value


def spec(
    kind: Kind,
    *,
    help: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] = (),
    nullable: bool = False,
    items: str = "names",
) -> Spec:
    """A `Spec`; numbers take one lower and one upper bound, choices a non-empty tuple."""
    given = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    bounds = tuple((op, b) for op, b in given.items() if b is not None)
    if kind in ("float", "int"):
        if (ge is None) == (gt is None) or (le is None) == (lt is None):
            raise TypeError(f"a {kind} setting needs one lower and one upper bound")
        if kind == "float":
            # The bounds print as floats in error messages and schemas, as the values are.
            bounds = tuple((op, float(b)) for op, b in bounds)
    elif bounds:
        raise TypeError(f"a {kind} setting takes no bounds")
    if (kind == "choice") != bool(choices):
        raise TypeError("choices go with kind 'choice' only")
    return Spec(kind, help, bounds, tuple(choices), nullable, items)


def setting(
    default: Any,
    *,
    help: str,
    kind: Kind | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] = (),
    nullable: bool = False,
    items: str = "names",
) -> Any:
    """A dataclass field declaring its spec: ``kind`` is taken from the default unless given
    (a None default needs it) and ``choices`` alone means ``choice``; the rest as `spec`."""
    if kind is None:
        kind = _kind_of(default, choices)
    rule = spec(
        kind,
        help=help,
        ge=ge,
        gt=gt,
        le=le,
        lt=lt,
        choices=choices,
        nullable=nullable,
        items=items,
    )
    return rule.at(default)


def _kind_of(default: Any, choices: tuple[str, ...]) -> Kind:
    if choices:
        return "choice"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    raise TypeError(f"name the kind of a setting whose default is {default!r}")


def specs(config: Any) -> Iterator[tuple[dataclasses.Field[Any], Spec]]:
    """The fields of a config dataclass (class or instance) with their specs; a field
    without one is a mistake in the config, named here."""
    for f in dataclasses.fields(config):
        found = f.metadata.get(SPEC)
        if not isinstance(found, Spec):
            raise TypeError(f"{f.name} is declared without setting(...)")
        yield f, found
