"""A batch input file built to break the reader: every kind of bad line we know of, next to good
ones. `write_hostile_input(path)` returns what each line must become in the ledger.

Used end to end against a real llama-server (tests/flows/test_batch_hardening.py): every line
must be accounted for, the good ones answered.
"""

from __future__ import annotations

import json
from pathlib import Path

GOOD = "ok"  # the line must be answered

# (raw bytes of the line, expected custom_id, expected outcome: GOOD or an error kind)
_LINES: list[tuple[bytes, str, str]] = []


def _add(raw: bytes | str, custom_id: str, outcome: str) -> None:
    _LINES.append((raw.encode() if isinstance(raw, str) else raw, custom_id, outcome))


def _json(obj) -> str:
    return json.dumps(obj)


# line 1 starts with a UTF-8 BOM: accepted
_add(b"\xef\xbb\xbf" + _json({"custom_id": "bom", "prompt": "hello"}).encode(), "bom", GOOD)
_add(_json({"custom_id": "plain", "prompt": "hi"}), "plain", GOOD)
_add(b'{"custom_id": "latin1", "prompt": "caf\xe9"}', "latin1", "invalid_encoding")
_add(b'{"custom_id": "caf\xe9", "prompt": "x"}', "line-{n}", "invalid_encoding")
_add(b"\xff\xfe{\x00}\x00", "line-{n}", "invalid_encoding")
_add("{not json", "line-{n}", "invalid_json")
_add("[1, 2, 3]", "line-{n}", "invalid_json")
_add('"just a string"', "line-{n}", "invalid_json")
_add(
    '{"custom_id": "big", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}",
    "line-{n}",
    "invalid_json",
)
_add(
    '{"custom_id": "deep", "prompt": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "line-{n}",
    "invalid_json",
)
_add('{"custom_id": "nan", "prompt": "x", "temperature": NaN}', "line-{n}", "invalid_json")
_add(_json({"custom_id": ["list"], "prompt": "x"}), "line-{n}", "invalid_json")
_add(
    _json({"custom_id": "surrogate\ud800", "prompt": "lone surrogate id"}), "surrogate\ud800", GOOD
)
_add(_json({"custom_id": 12345, "prompt": "numeric id"}), "12345", GOOD)
_add(_json({"custom_id": "nothing"}), "nothing", "missing_prompt")
_add(_json({"custom_id": "blank", "prompt": "   "}), "blank", "missing_prompt")
_add(_json({"custom_id": "prompt-num", "prompt": 42}), "prompt-num", "missing_prompt")
_add(_json({"custom_id": "empty-list", "messages": []}), "empty-list", "invalid_messages")
_add(
    _json({"custom_id": "empty-msg", "messages": [{"role": "user", "content": ""}]}),
    "empty-msg",
    "invalid_messages",
)
_add(_json({"custom_id": "no-role", "messages": [{"content": "x"}]}), "no-role", "invalid_messages")
_add(
    _json(
        {
            "custom_id": "ends-assistant",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        }
    ),
    "ends-assistant",
    "invalid_messages",
)
_add(_json({"custom_id": "msg-not-obj", "messages": ["hi"]}), "msg-not-obj", "invalid_messages")
_add(
    _json({"custom_id": "content-num", "messages": [{"role": "user", "content": 5}]}),
    "content-num",
    "invalid_messages",
)
_add(
    _json(
        {
            "custom_id": "image",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "see"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                }
            ],
        }
    ),
    "image",
    "unsupported",
)
_add(
    _json(
        {
            "custom_id": "parts",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "two "},
                        {"type": "text", "text": "parts"},
                    ],
                }
            ],
        }
    ),
    "parts",
    GOOD,
)
_add(
    _json(
        {
            "custom_id": "empty-parts",
            "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}],
        }
    ),
    "empty-parts",
    "invalid_messages",
)
_add(
    _json({"custom_id": "tool", "messages": [{"role": "tool", "content": "x"}]}),
    "tool",
    "unsupported",
)
_add(
    _json(
        {
            "custom_id": "schema-str",
            "prompt": "x",
            "response_format": {"type": "json_schema", "json_schema": "x"},
        }
    ),
    "schema-str",
    "invalid_settings",
)
_add(
    _json(
        {
            "custom_id": "schema-bad",
            "prompt": "x",
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 12}}},
        }
    ),
    "schema-bad",
    "invalid_settings",
)
_add(
    _json({"custom_id": "rf-xml", "prompt": "x", "response_format": {"type": "xml"}}),
    "rf-xml",
    "invalid_settings",
)
_add(
    _json({"custom_id": "rf-list", "prompt": "x", "response_format": ["json"]}),
    "rf-list",
    "invalid_settings",
)
_add(
    _json({"custom_id": "max-zero", "prompt": "x", "max_tokens": 0}), "max-zero", "invalid_settings"
)
_add(
    _json({"custom_id": "max-bool", "prompt": "x", "max_tokens": True}),
    "max-bool",
    "invalid_settings",
)
_add(
    _json({"custom_id": "temp-str", "prompt": "x", "temperature": "hot"}),
    "temp-str",
    "invalid_settings",
)
_add(
    _json({"custom_id": "complete", "url": "/v1/completions", "body": {"prompt": "x"}}),
    "complete",
    "unsupported",
)
_add(
    _json({"custom_id": "body-str", "url": "/v1/chat/completions", "body": "x"}),
    "body-str",
    "invalid_messages",
)
_add(_json({"custom_id": "plain", "prompt": "again"}), "plain", "duplicate_id")
_add("   \t  ", "", "blank")  # blank: skipped, no line
_add(_json({"prompt": "I have no id"}), "line-{n}", GOOD)
_add("\x00\x01\x02", "line-{n}", "invalid_json")
_add(
    _json(
        {
            "custom_id": "openai",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 4},
        }
    ),
    "openai",
    GOOD,
)


def write_hostile_input(path: Path) -> dict[int, tuple[str, str]]:
    """Write the file; returns {line number: (custom_id, GOOD or error kind)} for non-blank lines."""
    expected: dict[int, tuple[str, str]] = {}
    with open(path, "wb") as out:
        for number, (raw, custom_id, outcome) in enumerate(_LINES, start=1):
            out.write(raw + b"\n")
            if outcome != "blank":
                expected[number] = (custom_id.format(n=number), outcome)
    return expected


ERROR_KINDS_COVERED = {outcome for _, _, outcome in _LINES} - {GOOD, "blank"}
