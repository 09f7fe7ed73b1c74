"""Batch input: a JSONL file read one line at a time, each line an item or an input error.

Accepted lines (one JSON object each):

    {"custom_id": "a1", "prompt": "Summarise ..."}
    {"custom_id": "a2", "messages": [{"role": "system", "content": "..."}, {"role": "user", ...}]}
    {"custom_id": "a3", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [...], "max_tokens": 64, "temperature": 0, "response_format": {...}}}

`max_tokens`, `temperature` and `response_format` may also sit at the top level of the first two
forms. A line without `custom_id` is named after its line number (`line-7`). Blank lines are
skipped. Nothing here holds more than one line at a time, except the ids seen so far.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "developer", "user", "assistant")
CHAT_COMPLETIONS_URLS = ("/v1/chat/completions", "/chat/completions")


@dataclass(frozen=True)
class BatchItem:
    custom_id: str
    line: int
    messages: list[dict[str, str]]  # role + text content; the last one is the user's
    max_tokens: int | None = None
    temperature: float | None = None
    output_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class InputError:
    custom_id: str
    line: int
    kind: str  # invalid_json | missing_prompt | invalid_messages | duplicate_id | unsupported
    message: str


@dataclass
class InputReader:
    """Yields `BatchItem`s and `InputError`s from a JSONL file, streaming."""

    path: Path
    first_line_of: dict[str, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[BatchItem | InputError]:
        with open(self.path, encoding="utf-8", errors="replace") as lines:
            for number, text in enumerate(lines, start=1):
                if not text.strip():
                    continue
                entry = parse_line(text, number)
                first = self.first_line_of.setdefault(entry.custom_id, number)
                if first != number:
                    yield InputError(
                        entry.custom_id,
                        number,
                        "duplicate_id",
                        f"line {number}: custom_id {entry.custom_id!r} repeats line {first}; "
                        "give every line its own custom_id",
                    )
                    continue
                yield entry


def count_lines(path: Path) -> int:
    """Non-blank-agnostic line count, read in blocks (for progress totals)."""
    count = 0
    last = b"\n"
    with open(path, "rb") as data:
        while block := data.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def parse_line(text: str, number: int) -> BatchItem | InputError:
    fallback_id = f"line-{number}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return InputError(
            fallback_id,
            number,
            "invalid_json",
            f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})",
        )
    if not isinstance(obj, dict):
        return InputError(
            fallback_id, number, "invalid_json", f"line {number} is not a JSON object"
        )

    raw_id = obj.get("custom_id")
    if raw_id is None or raw_id == "":
        custom_id = fallback_id
    elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool):
        custom_id = str(raw_id)
    else:
        return InputError(
            fallback_id, number, "invalid_json", f"line {number}: custom_id must be a string"
        )

    def error(kind: str, message: str) -> InputError:
        return InputError(custom_id, number, kind, f"line {number}: {message}")

    source = obj
    if "body" in obj:
        url = obj.get("url")
        if url is not None and url not in CHAT_COMPLETIONS_URLS:
            return error("unsupported", f"url {url!r} is not supported; use /v1/chat/completions")
        source = obj["body"]
        if not isinstance(source, dict):
            return error("invalid_messages", "body must be a JSON object")

    if "messages" in source:
        messages = _messages(source["messages"])
        if isinstance(messages, str):
            return error("invalid_messages", messages)
    elif isinstance(source.get("prompt"), str) and source["prompt"].strip():
        messages = [{"role": "user", "content": source["prompt"]}]
    else:
        return error(
            "missing_prompt",
            'no prompt: give "prompt" (a non-empty string), "messages" (a chat list) '
            'or an OpenAI batch "body" with "messages"',
        )

    settings = _settings(source)
    if isinstance(settings, str):
        return error("invalid_settings", settings)
    return BatchItem(custom_id, number, messages, **settings)


def _messages(value: Any) -> list[dict[str, str]] | str:
    """Validated role/text messages, or the reason they are not usable."""
    if not isinstance(value, list) or not value:
        return "messages must be a non-empty list"
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{index}] needs a role of {', '.join(ROLES)}"
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = [part.get("text") for part in content if isinstance(part, dict)]
            if any(part.get("type") != "text" for part in content if isinstance(part, dict)):
                return f"messages[{index}]: only text content parts are supported"
            content = "".join(text for text in texts if isinstance(text, str))
        if not isinstance(content, str):
            return f"messages[{index}].content must be a string or a list of text parts"
        messages.append({"role": message["role"], "content": content})
    if messages[-1]["role"] != "user":
        return "the last message must have role 'user'"
    return messages


def _settings(source: dict[str, Any]) -> dict[str, Any] | str:
    settings: dict[str, Any] = {}
    max_tokens = source.get("max_tokens", source.get("max_completion_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return "max_tokens must be a positive integer"
        settings["max_tokens"] = max_tokens
    temperature = source.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or isinstance(temperature, bool):
            return "temperature must be a number"
        settings["temperature"] = float(temperature)
    response_format = source.get("response_format")
    if response_format is not None:
        schema = _schema_from_response_format(response_format)
        if isinstance(schema, str):
            return schema
        settings["output_schema"] = schema
    return settings


def _schema_from_response_format(response_format: Any) -> dict[str, Any] | None | str:
    if not isinstance(response_format, dict):
        return "response_format must be an object"
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            return schema
        return "response_format.json_schema.schema must be a JSON Schema object"
    if kind == "json_object":
        return {"type": "object"}
    return f"response_format type {kind!r} is not supported (use text, json_object, json_schema)"
