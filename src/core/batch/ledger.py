"""The output file is the ledger: one JSON line per finished item, appended and flushed.

Output line (see README "Batch output format"):

    {"custom_id": "a1", "line": 1, "output": "..." | {...}, "error": null,
     "usage": {"prompt_tokens": 20, "completion_tokens": 16}, "model": "qwen3",
     "latency_s": 0.41, "attempts": 1, "finished_at": "2026-11-26T05:00:00+00:00"}

A failed item has `"output": null` and `"error": {"kind": ..., "message": ...}`. On a rerun the
ledger is read first: ids with a success line are skipped, failed ones are tried again, and a
last line cut short by a crash is dropped (the file is truncated back to its last full line).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

# Errors about the input line itself: rewriting them on every rerun would only add noise.
INPUT_ERROR_KINDS = frozenset(
    {
        "invalid_json",
        "missing_prompt",
        "invalid_messages",
        "invalid_settings",
        "duplicate_id",
        "unsupported",
    }
)


@dataclass
class LedgerState:
    succeeded_ids: set[str] = field(default_factory=set)
    input_error_lines: set[int] = field(default_factory=set)
    dropped_partial_line: bool = False
    unreadable_lines: int = 0


def read_ledger(path: Path) -> LedgerState:
    """What an earlier run finished. Truncates a partial last line in place."""
    state = LedgerState()
    if not path.exists():
        return state
    complete_bytes = 0
    with open(path, "rb") as ledger:
        for raw in ledger:
            if not raw.endswith(b"\n"):
                state.dropped_partial_line = True  # a crash mid-write; the item runs again
                break
            complete_bytes += len(raw)
            try:
                record = json.loads(raw)
                custom_id = record["custom_id"]
            except (ValueError, KeyError, TypeError):
                state.unreadable_lines += 1
                continue
            error = record.get("error")
            if error is None:
                state.succeeded_ids.add(str(custom_id))
            elif isinstance(error, dict) and error.get("kind") in INPUT_ERROR_KINDS:
                state.input_error_lines.add(record.get("line"))
    if state.dropped_partial_line:
        os.truncate(path, complete_bytes)
    return state


class LedgerWriter:
    """Appends one line per result and flushes it at once, so a crash loses only what is in flight."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        self.lines_written = 0

    def write(self, record: dict[str, Any]) -> None:
        record.setdefault("finished_at", datetime.now(UTC).isoformat(timespec="milliseconds"))
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.lines_written += 1

    def sync(self) -> None:
        """Flush to the disk, not only to the OS (at chunk ends: survives a machine crash too)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
