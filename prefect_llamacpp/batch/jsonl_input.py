"""Batch input: a JSONL file read one line at a time; every line becomes an item or an input error.

Accepted lines (one JSON object each):

    {"custom_id": "a1", "prompt": "Summarise ..."}
    {"custom_id": "a2", "messages": [{"role": "system", "content": "..."}, {"role": "user", ...}]}
    {"custom_id": "a3", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [...], "max_tokens": 64, "temperature": 0, "response_format": {...}}}
    {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "text"}}
    {"custom_id": "e2", "input": ["text", "more text"]}          (read with `embeddings=True`)

Chat lines may carry `chat_template_kwargs` (e.g. `{"enable_thinking": false}`).

`max_tokens`, `temperature` and `response_format` may also sit at the top level of the first two
forms. A line without `custom_id` is named after its line number (`line-7`). Blank lines are
skipped. Nothing in a line can stop the reader: bytes that are not UTF-8, a BOM, numbers or
nesting past what JSON readers take, hostile schemas, lines past `MAX_LINE_BYTES` all become an
`InputError` naming the line. Nothing here holds more than one line at a time, except the ids seen.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from prefect_llamacpp.batch.records import InputErrorKind
from prefect_llamacpp.request import fingerprint, schema_problem
from prefect_llamacpp.storage import open_input

ROLES = ("system", "developer", "user", "assistant")
CHAT_COMPLETIONS_URLS = ("/v1/chat/completions", "/chat/completions")
EMBEDDINGS_URLS = ("/v1/embeddings", "/embeddings")
MAX_EMBEDDING_INPUTS = 2048  # per line, as OpenAI allows per request
MAX_LINE_BYTES = 32 * 1024 * 1024  # one prompt line; the reader never holds more than this
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class BatchItem:
    custom_id: str
    line: int
    messages: list[dict[str, str]]  # role + non-empty text content; the last one is the user's
    max_tokens: int | None = None
    temperature: float | None = None
    output_schema: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None  # the line's own stop, seed, top_p, penalties
    model: str | None = None  # the model the line asks for: only servers serving it run it
    chat_template_kwargs: dict[str, Any] | None = None  # variables for the chat template
    # An embedding line: its texts (`messages` is empty), whether it gave one text or a list
    # (its output is one vector or a list), and the vector encoding the line asked for.
    inputs: tuple[str, ...] | None = None
    single_input: bool = False
    encoding_format: str | None = None

    @property
    def embeddings(self) -> bool:
        return self.inputs is not None

    @cached_property
    def input_fp(self) -> str:
        """Fingerprint of what the line itself asks (messages and its own settings).

        Only the fields the line sets count, so a field added in a later version leaves the
        fingerprints of existing ledgers as they were."""
        if self.inputs is not None:
            asked = {
                "input": self.inputs[0] if self.single_input else list(self.inputs),
                "model": self.model,
                "encoding_format": self.encoding_format,
            }
            return fingerprint({key: value for key, value in asked.items() if value is not None})
        asked = {
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "output_schema": self.output_schema,
            "sampling": self.sampling,
            "model": self.model,
            "chat_template_kwargs": self.chat_template_kwargs,
        }
        return fingerprint({key: value for key, value in asked.items() if value is not None})


@dataclass(frozen=True)
class InputError:
    custom_id: str
    line: int
    kind: InputErrorKind
    message: str


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (from 1): the lines whose custom_id hashes to it. Every shard
    reads the whole input and keeps its own lines, so nothing is copied or planned, and all the
    lines of one id (a repeated id included) land in one shard."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"2/3"`; raises ValueError naming the form."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard {text!r} is not K/N (e.g. 2/3)") from None
        if not 1 <= index <= count:
            raise ValueError(f"shard {text!r}: K must be from 1 to N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, custom_id: str) -> bool:
        digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8)
        return int.from_bytes(digest.digest(), "big") % self.count == self.index - 1


@dataclass
class InputReader:
    """Yields `BatchItem`s and `InputError`s from a JSONL file, streaming. `embeddings`: lines
    of the native form are `{"custom_id", "input"}` texts to embed (OpenAI lines name their url).
    """

    path: str | Path  # a local path or a URL (prefect_llamacpp/storage.py)
    first_line_of: dict[str, int] = field(default_factory=dict)
    embeddings: bool = False
    shard: Shard | None = None  # only this shard's lines

    def __iter__(self) -> Iterator[BatchItem | InputError]:
        for number, raw in _raw_lines(self.path):
            if self.shard is not None:
                key = _plain_id(raw)
                if key is None:  # no plain id to hash: the parsed line's (`line-7`, a number)
                    entry = _entry(raw, number, self.embeddings)
                    if entry is None or not self.shard.owns(entry.custom_id):
                        continue
                elif not self.shard.owns(key):
                    continue
                else:
                    entry = _entry(raw, number, self.embeddings)
            else:
                entry = _entry(raw, number, self.embeddings)
            if entry is None:
                continue
            first = self.first_line_of.setdefault(entry.custom_id, number)
            if first != number:
                yield InputError(
                    entry.custom_id,
                    number,
                    "duplicate_id",
                    f"line {number}: custom_id {_shown(entry.custom_id)} repeats line {first}; "
                    "give every line its own custom_id",
                )
                continue
            yield entry


def _plain_id(raw: bytes | None) -> str | None:
    """The line's custom_id when it is a plain non-empty string, read without validating the
    rest (the lines of other shards are only hashed); None: parse the line to know its id."""
    if raw is None or b"custom_id" not in raw:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    raw_id = obj.get("custom_id") if isinstance(obj, dict) else None
    return raw_id if isinstance(raw_id, str) and raw_id else None


def count_lines(path: str | Path) -> int:
    """Line count (for progress totals)."""
    return scan_input(path)[0]


def scan_input(path: str | Path) -> tuple[int, int, int]:
    """Line count (for progress totals), how many lines are OpenAI embedding lines and how many
    other non-blank lines there are, so the gate can ask the servers for embeddings before
    anything is sent. Only lines that may name the url (or escape characters) are parsed."""
    sample = sample_input(path)
    return sample.lines, sample.embedding_lines, sample.other_lines


@dataclass(frozen=True)
class InputSample:
    """What the first `bytes_read` bytes of an input hold (`whole`: the input is that long)."""

    lines: int
    embedding_lines: int
    other_lines: int
    bytes_read: int
    whole: bool


def sample_input(path: str | Path, limit_bytes: int | None = None) -> InputSample:
    """`scan_input`, stopping after the line that reaches `limit_bytes` (None: the whole input):
    an object-storage input is sampled, not downloaded whole before the first request."""
    count = embedding_lines = other_lines = read = 0
    with open_input(path) as lines:
        for raw in lines:
            count += 1
            read += len(raw)
            if raw.strip():
                if (b"embeddings" in raw or b"\\u" in raw) and _is_embedding_line(raw):
                    embedding_lines += 1
                else:
                    other_lines += 1
            if limit_bytes is not None and read >= limit_bytes:
                return InputSample(
                    count, embedding_lines, other_lines, read, whole=not lines.peek(1)
                )
    return InputSample(count, embedding_lines, other_lines, read, whole=True)


def _is_embedding_line(raw: bytes) -> bool:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and "body" in obj and obj.get("url") in EMBEDDINGS_URLS


def _raw_lines(path: str | Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line; None for a line longer than `MAX_LINE_BYTES` (skipped)."""
    with open_input(path) as lines:
        number = 0
        while True:
            raw = lines.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := lines.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
                continue
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            yield number, raw


def _entry(raw: bytes | None, number: int, embeddings: bool) -> BatchItem | InputError | None:
    if raw is None:
        return InputError(
            f"line-{number}",
            number,
            "too_large",
            f"line {number} is longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB; split it",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _encoding_error(raw, number, exc)
    if not text.strip():
        return None
    try:
        entry = parse_line(text, number, embeddings=embeddings)
        if isinstance(entry, BatchItem):
            entry.input_fp  # noqa: B018 -- computed here, inside the safety net
        return entry
    except Exception as exc:  # the reader's promise: no line can stop the run
        return InputError(
            f"line-{number}",
            number,
            "unsupported",
            f"line {number} could not be read ({type(exc).__name__})",
        )


def _encoding_error(raw: bytes, number: int, exc: UnicodeDecodeError) -> InputError:
    custom_id = f"line-{number}"
    # Name the line by its custom_id when that part is intact, never by a repaired one: two
    # ids that differ only in bad bytes must not merge.
    try:
        obj = json.loads(raw.decode("utf-8", errors="replace"))
        raw_id = obj.get("custom_id") if isinstance(obj, dict) else None
        if isinstance(raw_id, str) and raw_id and "\ufffd" not in raw_id:
            custom_id = raw_id
    except (ValueError, RecursionError):
        pass
    hint = " (the file looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return InputError(
        custom_id,
        number,
        "invalid_encoding",
        f"line {number} is not UTF-8{hint}: byte 0x{raw[exc.start]:02x} at position "
        f"{exc.start}; save the file as UTF-8",
    )


def parse_line(text: str, number: int, *, embeddings: bool = False) -> BatchItem | InputError:
    """One input line as an item or an input error. Raises nothing for any text. `embeddings`:
    a native line is a text to embed (`input`), not a prompt."""
    fallback_id = f"line-{number}"
    try:
        if text.startswith("\ufeff"):  # as `json.loads` does
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return InputError(
            fallback_id,
            number,
            "invalid_json",
            f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})",
        )
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
        return InputError(
            fallback_id, number, "invalid_json", f"line {number} cannot be read as JSON: {why}"
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

    def error(kind: InputErrorKind, message: str) -> InputError:
        return InputError(custom_id, number, kind, f"line {number}: {message}")

    source = obj
    if "body" in obj:
        url = obj.get("url")
        if url is not None and url not in CHAT_COMPLETIONS_URLS + EMBEDDINGS_URLS:
            return error(
                "unsupported",
                f"url {_shown(url)} is not supported; use /v1/chat/completions or /v1/embeddings",
            )
        method = obj.get("method")
        if method is not None and method != "POST":
            return error("unsupported", f"method {_shown(method)} is not supported; use POST")
        source = obj["body"]
        if not isinstance(source, dict):
            return error("invalid_messages", "body must be a JSON object")
        embeddings = url in EMBEDDINGS_URLS
    elif embeddings and "input" not in obj and ("prompt" in obj or "messages" in obj):
        embeddings = False  # a chat line in an embeddings run: run it as one
    if embeddings:
        return _embedding_item(source, custom_id, number, error, openai="body" in obj)

    if "messages" in source:
        messages = _messages(source["messages"])
        if isinstance(messages, InputError):
            return error(messages.kind, messages.message)
    elif isinstance(source.get("prompt"), str) and source["prompt"].strip():
        messages = [{"role": "user", "content": source["prompt"]}]
    elif "prompt" in source:
        return error("missing_prompt", '"prompt" must be a non-empty string')
    elif "input" in source and "body" not in obj:
        return error(
            "missing_prompt",
            'no prompt: "input" is a text to embed, read as such only in an embeddings run '
            '(embeddings=True, CLI --embeddings); a chat line gives "prompt" or "messages"',
        )
    else:
        return error(
            "missing_prompt",
            'no prompt: give "prompt" (a non-empty string), "messages" (a chat list) '
            'or an OpenAI batch "body" with "messages"',
        )

    settings = _settings(source)
    if isinstance(settings, tuple):
        return error(*settings)
    if isinstance(settings, str):
        return error("invalid_settings", settings)
    return BatchItem(custom_id, number, messages, **settings)


def _embedding_item(
    source: dict[str, Any], custom_id: str, number: int, error, *, openai: bool
) -> BatchItem | InputError:
    """An embedding line (`input`: a text or a list of texts) as an item."""
    value = source.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        return error("missing_prompt", '"input" must be a non-empty string or list of strings')
    if len(texts) > MAX_EMBEDDING_INPUTS:
        return error(
            "too_large", f'"input" holds {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS}'
        )
    for text in texts:
        if not isinstance(text, str):
            return error(
                "unsupported",
                '"input" must be text: token arrays are not supported by this batch',
            )
        if not text.strip():
            return error("missing_prompt", '"input" holds an empty text')
    if source.get("dimensions") is not None:
        return error("unsupported", "'dimensions' is not supported: llama-server ignores it")
    encoding = source.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        return error("invalid_settings", "encoding_format must be float or base64")
    model = source.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        return error("invalid_settings", "model must be a non-empty string")
    return BatchItem(
        custom_id,
        number,
        [],
        model=model.strip() if model else None,
        inputs=tuple(texts),
        single_input=isinstance(value, str),
        # An OpenAI line gets its answer in the encoding it asked for (OpenAI's default: float).
        encoding_format=(encoding or "float") if openai else encoding,
    )


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _messages(value: Any) -> list[dict[str, str]] | InputError:
    """Validated role/text messages, or why they are not usable (kind and message)."""

    def bad(kind: InputErrorKind, message: str) -> InputError:
        return InputError("", 0, kind, message)

    if not isinstance(value, list) or not value:
        return bad("invalid_messages", "messages must be a non-empty list")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            return bad("invalid_messages", f"messages[{index}] must be an object")
        role = message.get("role")
        if role in ("tool", "function"):
            return bad("unsupported", f"messages[{index}]: role {role!r} (tool calls) is not run")
        if role not in ROLES:
            return bad("invalid_messages", f"messages[{index}] needs a role of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: text parts joined
            texts = []
            for part in content:
                if not isinstance(part, dict):
                    return bad(
                        "invalid_messages", f"messages[{index}]: a content part is not an object"
                    )
                if part.get("type") != "text":
                    return bad(
                        "unsupported",
                        f"messages[{index}]: content part type {_shown(part.get('type'))} is not "
                        "supported; only text parts",
                    )
                if not isinstance(part.get("text"), str):
                    return bad("invalid_messages", f"messages[{index}]: a text part has no text")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            return bad(
                "invalid_messages",
                f"messages[{index}].content must be a string or a list of text parts",
            )
        if not content.strip():
            return bad("invalid_messages", f"messages[{index}].content is empty")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        return bad("invalid_messages", "the last message must have role 'user'")
    return messages


# OpenAI request fields a line may carry and that are sent as they are, with their checks.
_SAMPLING: dict[str, Any] = {
    "stop": lambda v: (
        isinstance(v, str)
        or (isinstance(v, list) and len(v) <= 16 and all(isinstance(s, str) for s in v))
    ),
    "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "top_p": lambda v: _number(v) and 0 <= v <= 1,
    "presence_penalty": lambda v: _number(v) and -2 <= v <= 2,
    "frequency_penalty": lambda v: _number(v) and -2 <= v <= 2,
}
# Request fields this batch does not run: answering without them would answer another request.
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "prediction")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _settings(source: dict[str, Any]) -> dict[str, Any] | str | tuple[InputErrorKind, str]:
    settings: dict[str, Any] = {}
    model = source.get("model")
    if model is not None:
        if not isinstance(model, str) or not model.strip():
            return "model must be a non-empty string"
        settings["model"] = model.strip()
    for name in _UNSUPPORTED:
        if source.get(name) is not None:
            return ("unsupported", f"{name!r} is not supported by this batch (tools are not run)")
    if source.get("n") not in (None, 1):
        return ("unsupported", "'n' must be 1: one answer per line")
    if source.get("stream") not in (None, False):
        return ("unsupported", "'stream' is not supported in a batch")
    kwargs = source.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
            return 'chat_template_kwargs must be an object (e.g. {"enable_thinking": false})'
        settings["chat_template_kwargs"] = kwargs
    sampling = {}
    for name, valid in _SAMPLING.items():
        if source.get(name) is not None:
            if not valid(source[name]):
                return f"{name} has an unusable value"
            sampling[name] = source[name]
    if sampling:
        settings["sampling"] = sampling
    max_tokens = source.get("max_tokens", source.get("max_completion_tokens"))
    if max_tokens is not None:
        if (
            not isinstance(max_tokens, int)
            or isinstance(max_tokens, bool)
            or not 1 <= max_tokens <= 1 << 31
        ):
            return "max_tokens must be a positive integer"
        settings["max_tokens"] = max_tokens
    temperature = source.get("temperature")
    if temperature is not None:
        if (
            not isinstance(temperature, int | float)
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or not 0 <= temperature <= 100
        ):
            return "temperature must be a number from 0 to 100"
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
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            return "response_format.json_schema.schema must be a JSON Schema object"
        problem = schema_problem(schema)
        return f"response_format.json_schema.schema is {problem}" if problem else schema
    return (
        f"response_format type {_shown(kind)} is not supported (use text, json_object, json_schema)"
    )


def _shown(value: Any) -> str:
    """A value for an error message: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Built once: `json.loads` with options builds a decoder per line (an eighth of a line's cost).
_DECODER = json.JSONDecoder(parse_constant=_no_constants)
