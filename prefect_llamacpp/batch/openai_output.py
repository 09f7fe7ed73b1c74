"""The OpenAI Batch output format: a result line rendered as OpenAI writes its batch output files.

    {"id": "batch_req_<hex>", "custom_id": "a1",
     "response": {"status_code": 200, "request_id": "req_<hex>", "body": {...}} | null,
     "error": {"code": "<our error kind>", "message": "..."} | null,
     "llamacpp": {"line": 1, "input_fp": "...", "settings_fp": "...", "attempts": 1, ...}}

- `response` is there whenever the server answered, with the body as llama-server sent it (a
  chat completion or an embedding list, or an HTTP error's `{"error": {...}}` with its status);
  it is null when no answer came (an input error, a timeout, a crash).
- `error` is set whenever the line failed, also when the server answered (a 400, an answer that
  did not fit the schema); `code` is one of the kinds in `records.py`.
- `llamacpp` holds our own facts, those a resume needs (fingerprints, line number) and those the
  native format reports (attempts, latency, server, model, usage, finished_at), under one key so
  the line still fits OpenAI's shape and readers matching on `custom_id` see nothing new.
  `output` and `reasoning` are not repeated there when a `response` carries the body they were
  read from; a line without one keeps them, so nothing the native line says is lost.

OpenAI has no SDK type for the line itself; `id` and `request_id` are random, as OpenAI's are to
its readers (llama-server sends no request id of its own).

Failed lines are also appended, the same bytes, to an errors file beside the output (OpenAI
gives failed requests a file of their own); the ledger names it and writes it under its lock.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any

from prefect_llamacpp.batch.records import ResultLine

FACTS_KEY = "llamacpp"
# What the OpenAI fields already say, or (when a body carries them) what the body holds.
_NOT_FACTS = frozenset({"custom_id", "error", "response"})
_IN_THE_BODY = frozenset({"output", "reasoning"})


def render_openai_line(record: ResultLine) -> dict[str, Any]:
    """The OpenAI Batch output line for one result line (`record` is left as it is)."""
    response = record.get("response")
    hidden = _NOT_FACTS | _IN_THE_BODY if response is not None else _NOT_FACTS
    error = record["error"]
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": record["custom_id"],
        "response": None
        if response is None
        else {
            "status_code": response["status_code"],
            "request_id": f"req_{uuid.uuid4().hex}",
            "body": response["body"],
        },
        "error": None if error is None else {"code": error["kind"], "message": error["message"]},
        FACTS_KEY: {key: value for key, value in record.items() if key not in hidden},
    }


def is_openai_line(record: dict[str, Any]) -> bool:
    """True for a line this module wrote (OpenAI's own output lines carry no `llamacpp` key)."""
    return isinstance(record.get(FACTS_KEY), dict)


def read_openai_line(record: dict[str, Any]) -> dict[str, Any]:
    """The ledger's view of an OpenAI-format line: our facts, `custom_id` and the error as
    `{"kind", "message"}`, the keys a native line has. Takes a line `is_openai_line` accepts."""
    error = record.get("error")
    if isinstance(error, dict):
        error = {"kind": error.get("code"), "message": error.get("message")}
    return {**record[FACTS_KEY], "custom_id": record.get("custom_id"), "error": error}


class ErrorsFile:
    """The errors file: every failed line of the output again, in the same order, written after
    the output's line. So after a crash it can only lack the output's last failed lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def open(self) -> str | None:
        """Open the file if it exists, drop a torn last line (a crash mid-write: the output's
        line is whole and `catch_up` writes it again) and return its last line's `id`."""
        if not self.path.exists():
            return None
        self._file = file = open(self.path, "ab+")
        file.seek(0)
        last, complete_bytes = None, 0
        for raw in file:
            if not raw.endswith(b"\n") and _parse(raw) is None:
                file.truncate(complete_bytes)
                break
            complete_bytes += len(raw)
            last = raw
        if last is not None and not last.endswith(b"\n"):
            self.append(b"\n")  # complete but unterminated (edited by hand): keep it
        record = _parse(last) if last is not None else None
        return record.get("id") if record is not None else None

    def catch_up(self, output: IO[bytes], after_id: str | None) -> None:
        """Append the failed lines of `output` that come after the line `after_id` (all of
        them when None): a second pass over the output, only when the file lags it."""
        output.seek(0)
        seen = after_id is None
        for raw in output:
            record = _parse(raw) if raw.endswith(b"\n") else None
            if record is None or not is_openai_line(record) or record.get("error") is None:
                continue
            if seen:
                self.append(raw)
            elif record.get("id") == after_id:
                seen = True

    def rebuild(self, output: IO[bytes]) -> None:
        """Write the file anew from `output`'s failed lines (none: no file): for an errors
        file that belongs to another output (the output was removed or replaced)."""
        self.close()
        self._file = None
        self.path.unlink(missing_ok=True)
        self.catch_up(output, None)

    def append(self, data: bytes) -> None:
        if self._file is None:  # created at the first failed line: never an empty file
            self._file = open(self.path, "ab+")
        self._file.write(data)
        self._file.flush()

    def sync(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None
