"""What the flows put in their markdown artifacts: a two-column table, a one-line chart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def markdown_table(title: str, rows: list[tuple[str, Any]]) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {str(value).replace('|', '/')} |" for name, value in rows]
    return "\n".join(lines) + "\n"


BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None]) -> str:
    """A chart in one line of text (▁▃█), as any markdown renders it: the lowest value is the
    lowest bar, the highest the highest; a missing one (None) is a gap (·)."""
    known = [value for value in values if value is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = (high - low) or 1.0
    top = len(BARS) - 1
    return "".join(
        "·" if value is None else BARS[round((value - low) / span * top) if high > low else 3]
        for value in values
    )
