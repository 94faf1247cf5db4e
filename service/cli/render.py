"""How the CLI prints: whole values when piped, small tables for metrics and the policy.

On a terminal, rich fits output to its width. Anywhere else (a pipe, a file, a CI log) the
console has no width limit, so ids and times are printed whole, never truncated or wrapped.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

# Wide enough for any row a command prints; rich pads nothing to it (tables do not expand).
_UNLIMITED = 100_000


class CliConsole(Console):
    """A rich console that only wraps to a width when it writes to a terminal."""

    @property
    def size(self) -> ConsoleDimensions:
        if not self.is_terminal:
            return ConsoleDimensions(_UNLIMITED, 25)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


out = CliConsole(highlight=False)
err = CliConsole(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    t = Table(title=title, show_lines=False)
    for col in columns:
        t.add_column(col, no_wrap=not out.is_terminal)
    for row in rows:
        t.add_row(*[cell(row.get(col)) for col in columns])
    out.print(t)


def kv(data: dict[str, Any], title: str | None = None) -> None:
    """Fields as a two-column table. Callers leave out large objects (metrics, the policy):
    those get their own tables (`metrics_table`, `policy_table`)."""
    t = Table(title=title, show_header=False)
    t.add_column("field", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold", no_wrap=not out.is_terminal)
    for key, value in data.items():
        t.add_row(key, cell(value))
    out.print(t)


SUMMARY_METRICS = (
    "forget_acc",
    "eval_acc",
    "eval_acc_retained_classes",
    "member_probe_acc",
    "forget_loss_auc",
    "mia_efficacy",
    "mia_confidence",
)


def metrics_table(metrics: dict[str, Any] | None, title: str = "metrics") -> None:
    """Before/after of the headline metrics, then calibration and timings in one line each."""
    metrics = metrics or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = [m for m in SUMMARY_METRICS if m in before or m in after]
    if names:
        t = Table(title=title)
        for col in ("metric", "before", "after"):
            t.add_column(col, no_wrap=True)
        for name in names:
            t.add_row(name, cell(before.get(name)), cell(after.get(name)))
        out.print(t)
    calibration = (metrics.get("influence") or {}).get("calibration") or {}
    if calibration:
        parts = [f"{k}={cell(calibration.get(k))}" for k in ("reason", "steps", "lr", "backtracks")]
        out.print("calibration: " + ", ".join(p for p in parts if not p.endswith("=-")))


def policy_table(policy: dict[str, Any] | None) -> None:
    """The release policy's decision: one row per check, then the reasons."""
    if not policy:
        return
    t = Table(title=f"release policy: {policy.get('decision')} (mode {policy.get('mode')})")
    for col in ("check", "value", "limit", "ok"):
        t.add_column(col, no_wrap=True)
    for check in policy.get("checks") or []:
        ok = check.get("ok")
        mark = "[green]pass[/]" if ok is True else "[red]fail[/]" if ok is False else "not run"
        t.add_row(str(check.get("name")), cell(check.get("value")), cell(check.get("limit")), mark)
    if policy.get("require_review"):
        t.add_row("require_review", "true", "-", "[yellow]review[/]")
    out.print(t)
    for reason in policy.get("reasons") or []:
        out.print(f"  held: {reason}", markup=False)


def forgetting_lines(request: dict[str, Any]) -> None:
    """How the request was answered: each attempt, the kind of forgetting, the evidence."""
    for i, attempt in enumerate(request.get("attempts") or [], 1):
        reason = f" ({attempt.get('reason')})" if attempt.get("reason") else ""
        out.print(
            f"attempt {i}: {attempt.get('method')} {attempt.get('outcome')}{reason} in "
            f"{attempt.get('seconds')} s",
            markup=False,
        )
    if request.get("forgetting"):
        out.print(f"forgetting: {request['forgetting']}", markup=False)
    evidence_line(request.get("evidence"))


def evidence_line(evidence: dict[str, Any] | None) -> None:
    """The membership test in one line: outcome, n, Z against its limit and band, the
    false-release rate against alpha."""
    if not evidence:
        return
    band = evidence.get("band") or [None, None]
    out.print(
        f"membership evidence: {evidence.get('outcome')} (n = {evidence.get('n')}, "
        f"Z = {cell(evidence.get('statistic'))}, forgotten at Z <= {cell(evidence.get('limit'))} "
        f"inside [{cell(band[0])}, {cell(band[1])}], false-release rate "
        f"{cell(evidence.get('false_release_rate'))} vs alpha {cell(evidence.get('alpha'))}; "
        f"before: {(evidence.get('before') or {}).get('outcome')})",
        markup=False,
    )


def human_size(n: int | float | None) -> str:
    """`19.4 kB`, `3.2 MB`: decimal units, so small files do not print as 0.0 MB."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
