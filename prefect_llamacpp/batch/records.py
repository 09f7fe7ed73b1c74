"""The batch vocabulary, in one place: the error kinds and the result line every run writes.

A result line (one per input line, JSONL, in the output file that is the ledger):

    {"custom_id": "a1", "line": 1, "output": "..." | {...}, "error": null,
     "usage": {"prompt_tokens": 20, "completion_tokens": 16}, "model": "qwen3",
     "latency_s": 0.41, "attempts": 1, "input_fp": "51ab...", "settings_fp": "9f2c...",
     "finished_at": "2026-11-26T05:00:00.123+00:00"}

Together `input_fp` (what the input line asked: its messages and its own settings) and
`settings_fp` (the run's settings: model, system prompt, schema, sampling) fingerprint the request
that was answered; a rerun skips an id only when both still match. A failed item has
`"output": null` and `"error": {"kind": ..., "message": ...}`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal, NotRequired, TypedDict, get_args

InputErrorKind = Literal[
    "invalid_encoding",  # the line is not UTF-8
    "invalid_json",  # not a JSON object (or numbers/nesting past what JSON readers allow)
    "too_large",  # the line is longer than the reader takes
    "missing_prompt",  # no prompt, messages or body
    "invalid_messages",  # messages malformed, empty, or not ending with a user turn
    "invalid_settings",  # max_tokens, temperature or response_format unusable
    "duplicate_id",  # the custom_id repeats an earlier line
    "unsupported",  # valid, but not something this batch runs (image parts, tools, other urls)
]
ItemErrorKind = Literal[
    "ledger_mismatch",  # the ledger answered a different request under this id
    "no_server_for_model",  # the line names a model no server of the run serves
    "bad_request",  # 4xx for this request (e.g. the prompt exceeds the context)
    "validation",  # the answer does not fit the output schema (or could not be parsed)
    "invalid_response",  # the server's answer is not a chat completion
    "server_error",  # 5xx for this request
    "server_crash",  # the server died while this request ran, again and again
    "timeout",  # no answer within request_timeout, attempts used up
    "unreachable",  # the server could not be reached, attempts used up
    "server_unavailable",  # 408/429/502/503/504, attempts used up
]
ErrorKind = InputErrorKind | ItemErrorKind
# How result lines are written: ours (above), or OpenAI's batch output shape (`openai_output.py`).
OutputFormat = Literal["native", "openai"]

INPUT_ERROR_KINDS: frozenset[str] = frozenset(get_args(InputErrorKind))
ERROR_KINDS: frozenset[str] = INPUT_ERROR_KINDS | frozenset(get_args(ItemErrorKind))


class ResultError(TypedDict):
    kind: ErrorKind
    message: str


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int


class ResultLine(TypedDict):
    custom_id: str
    line: int
    output: Any
    error: ResultError | None
    usage: Usage | None
    model: str | None
    latency_s: float
    attempts: int
    settings_fp: str | None
    input_fp: str | None
    server: NotRequired[str]
    reasoning: NotRequired[str]  # a reasoning model's thoughts, apart from `output`
    finished_at: str
    # What the server answered (`body` as it came, or an HTTP error's), for the OpenAI Batch
    # output format; in memory only, the native format does not write it.
    response: NotRequired[ServerResponse]


class ServerResponse(TypedDict):
    status_code: int
    body: Any


def result_line(
    custom_id: str,
    line: int,
    *,
    output: Any = None,
    error: tuple[ErrorKind, str] | None = None,
    usage: Usage | None = None,
    model: str | None = None,
    latency_s: float = 0.0,
    attempts: int = 0,
    settings_fp: str | None = None,
    input_fp: str | None = None,
    server: str | None = None,
    reasoning: str | None = None,
    response: ServerResponse | None = None,
) -> ResultLine:
    """The one constructor of a result line. `server` (the block that answered) is written when
    the run has more than one server, `reasoning` when the model gave some."""
    line: ResultLine = {
        "custom_id": custom_id,
        "line": line,
        "output": output,
        "error": {"kind": error[0], "message": error[1]} if error else None,
        "usage": usage,
        "model": model,
        "latency_s": round(latency_s, 4),
        "attempts": attempts,
        "settings_fp": settings_fp,
        "input_fp": input_fp,
        "finished_at": _now(),
    }
    if server is not None:
        line["server"] = server
    if reasoning:
        line["reasoning"] = reasoning
    if response is not None:
        line["response"] = response
    return line


_last_stamp: tuple[int, str] = (-1, "")


def _now() -> str:
    """The time now in ISO 8601 to the millisecond, UTC. Lines written in the same millisecond
    (a pack of embeddings) share one formatted stamp: formatting was half a line's cost."""
    global _last_stamp
    ms = time.time_ns() // 1_000_000
    last = _last_stamp  # one read: another thread may replace it meanwhile
    if ms == last[0]:
        return last[1]
    seconds, part = divmod(ms, 1000)
    stamp = datetime.fromtimestamp(seconds, UTC).replace(microsecond=part * 1000)
    text = stamp.isoformat(timespec="milliseconds")
    _last_stamp = (ms, text)
    return text
