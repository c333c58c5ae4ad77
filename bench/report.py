"""Markdown for the benchmarks' and the drills' reports: one table helper, and the number formats."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """A Markdown table's lines: the header, the rule (``align`` has an ``l`` or ``r`` per column, left by
    default), then a line per row; cells are ``str()`` of the values."""
    rule = ["---:" if align[i : i + 1] == "r" else "---" for i in range(len(columns))]
    return [_line(columns), "|" + "|".join(rule) + "|", *(_line(row) for row in rows)]


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def median(values: Sequence[float | None]) -> float:
    """The median of the values present (None and NaN left out); NaN when there are none."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def fmt_rps(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) or math.isinf(value) else f"{value:.2f}"


def fmt_count(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:g}"


def mib(kib: float | None) -> str:
    return "?" if kib is None or math.isnan(kib) else f"{kib / 1024:.0f}"
