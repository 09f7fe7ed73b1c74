"""The two-column markdown table both flows put in their artifacts."""

from __future__ import annotations

from typing import Any


def markdown_table(title: str, rows: list[tuple[str, Any]]) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {str(value).replace('|', '/')} |" for name, value in rows]
    return "\n".join(lines) + "\n"
