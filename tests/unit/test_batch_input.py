from __future__ import annotations

import json

import pytest

from prefect_llamacpp.batch.jsonl_input import (
    MAX_EMBEDDING_INPUTS,
    BatchItem,
    InputError,
    InputReader,
    count_lines,
    parse_line,
    scan_input,
)


def test_prompt_line():
    item = parse_line('{"custom_id": "a", "prompt": "hi", "max_tokens": 5, "temperature": 0}', 1)
    assert item == BatchItem("a", 1, [{"role": "user", "content": "hi"}], 5, 0.0, None)


def test_messages_line_with_text_parts():
    line = json.dumps(
        {
            "custom_id": 7,
            "messages": [
                {"role": "system", "content": "s"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
        }
    )
    item = parse_line(line, 3)
    assert item.custom_id == "7"
    assert item.messages[-1] == {"role": "user", "content": "ab"}


def test_openai_batch_line():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    line = json.dumps(
        {
            "custom_id": "req-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "ignored",
                "messages": [{"role": "user", "content": "q"}],
                "max_completion_tokens": 9,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": schema},
                },
            },
        }
    )
    item = parse_line(line, 1)
    assert item.max_tokens == 9 and item.output_schema == schema


def test_missing_id_gets_the_line_number():
    assert parse_line('{"prompt": "x"}', 12).custom_id == "line-12"


@pytest.mark.parametrize(
    ("text", "kind", "words"),
    [
        ("{oops", "invalid_json", "not valid JSON"),
        ("[1, 2]", "invalid_json", "not a JSON object"),
        ('{"custom_id": "a"}', "missing_prompt", "no prompt"),
        ('{"custom_id": "a", "prompt": "  "}', "missing_prompt", "non-empty string"),
        ('{"custom_id": "a", "messages": []}', "invalid_messages", "non-empty list"),
        (
            '{"custom_id": "a", "messages": [{"role": "assistant", "content": "x"}]}',
            "invalid_messages",
            "last message",
        ),
        (
            '{"custom_id": "a", "messages": [{"role": "robot", "content": "x"}]}',
            "invalid_messages",
            "role",
        ),
        (
            '{"custom_id": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "unsupported",
            "only text parts",
        ),
        (
            '{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}',
            "unsupported",
            "/v1/embeddings",
        ),
        ('{"custom_id": "a", "prompt": "x", "max_tokens": 0}', "invalid_settings", "max_tokens"),
        (
            '{"custom_id": "a", "prompt": "x", "response_format": {"type": "xml"}}',
            "invalid_settings",
            "xml",
        ),
        ('{"custom_id": ["a"], "prompt": "x"}', "invalid_json", "custom_id"),
    ],
)
def test_bad_lines_name_their_line(text, kind, words):
    error = parse_line(text, 4)
    assert isinstance(error, InputError)
    assert error.kind == kind and error.line == 4
    assert "line 4" in error.message and words in error.message


def test_reader_streams_skips_blanks_and_flags_duplicates(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"custom_id": "a", "prompt": "1"}\n\n{"custom_id": "a", "prompt": "2"}\n{"prompt": "3"}'
    )
    entries = list(InputReader(path))
    assert [type(e).__name__ for e in entries] == ["BatchItem", "InputError", "BatchItem"]
    assert entries[1].kind == "duplicate_id" and "repeats line 1" in entries[1].message
    assert entries[2].custom_id == "line-4"
    assert count_lines(path) == 4


def test_any_bytes_give_one_entry_per_non_blank_line_and_never_raise(tmp_path):
    import random

    rng = random.Random(8)
    seeds = [
        b'{"custom_id": "a", "prompt": "hello"}',
        b'{"custom_id": "b", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}',
        b'{"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "q"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}}',
    ]
    lines = []
    for _ in range(3000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):  # flip, insert or delete bytes anywhere
            at = rng.randrange(len(raw))
            choice = rng.random()
            if choice < 0.4:
                raw[at] = rng.randrange(256)
            elif choice < 0.7:
                raw.insert(at, rng.randrange(256))
            else:
                del raw[at]
        lines.append(bytes(raw).replace(b"\n", b" "))
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    entries = list(InputReader(path))
    non_blank = [n for n, raw in enumerate(lines, start=1) if raw.strip(b" \t\r\x0b\x0c")]
    assert [entry.line for entry in entries] == non_blank
    kinds = {entry.kind for entry in entries if isinstance(entry, InputError)}
    assert {"invalid_json", "invalid_encoding"} <= kinds


def test_a_line_past_the_limit_is_an_error_and_the_next_line_is_read(tmp_path, monkeypatch):
    from prefect_llamacpp.batch import jsonl_input

    monkeypatch.setattr(jsonl_input, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps({"custom_id": "huge", "prompt": "x" * 5000})
        + "\n"
        + json.dumps({"custom_id": "next", "prompt": "y"})
        + "\n"
    )
    first, second = list(InputReader(path))
    assert first.kind == "too_large" and first.line == 1 and "split it" in first.message
    assert second.custom_id == "next" and second.line == 2


def test_a_bom_is_accepted_and_utf16_is_named(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"custom_id": "a", "prompt": "x"}\n')
    assert [entry.custom_id for entry in InputReader(path)] == ["a"]
    path.write_bytes('{"custom_id": "a", "prompt": "x"}\n'.encode("utf-16"))
    first = next(iter(InputReader(path)))
    assert first.kind == "invalid_encoding" and "UTF-16" in first.message


def test_ids_that_differ_only_in_bad_bytes_never_merge(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"custom_id": "caf\xe9", "prompt": "x"}\n{"custom_id": "caf\xe8", "prompt": "x"}\n'
    )
    first, second = list(InputReader(path))
    assert (first.kind, second.kind) == ("invalid_encoding", "invalid_encoding")
    assert first.custom_id != second.custom_id  # named by their line numbers, not a repaired id


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/definitions/nope"},
        {"$ref": "#"},
        {"type": 12},
        {"properties": {"a": {"$ref": "http://127.0.0.1:1/x.json"}}},
    ],
)
def test_a_hostile_schema_is_refused_when_read(schema):
    line = json.dumps(
        {
            "custom_id": "s",
            "prompt": "x",
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        }
    )
    error = parse_line(line, 3)
    assert isinstance(error, InputError) and error.kind == "invalid_settings", error


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"tools": [{"type": "function"}]}, "unsupported"),
        ({"n": 3}, "unsupported"),
        ({"stream": True}, "unsupported"),
        ({"top_p": 7}, "invalid_settings"),
        ({"stop": [1, 2]}, "invalid_settings"),
    ],
)
def test_request_fields_are_honoured_or_refused_never_dropped(fields, kind):
    line = json.dumps(
        {"custom_id": "a", "body": {"messages": [{"role": "user", "content": "q"}], **fields}}
    )
    error = parse_line(line, 2)
    assert isinstance(error, InputError) and error.kind == kind


def test_sampling_fields_of_a_line_are_sent_and_fingerprinted():
    from prefect_llamacpp.request import build_chat_request

    line = {"custom_id": "a", "prompt": "q", "stop": ["\n"], "seed": 7, "top_p": 0.5}
    item = parse_line(json.dumps(line), 1)
    body = json.loads(
        build_chat_request(
            item.messages, model="m", sampling=item.sampling, extra_body={"seed": 1}
        ).body
    )
    assert (body["stop"], body["seed"], body["top_p"]) == (["\n"], 7, 0.5)
    assert item.input_fp != parse_line(json.dumps({**line, "seed": 8}), 1).input_fp


# -- embedding lines ---------------------------------------------------------------------------


def test_openai_embedding_lines_are_items_in_any_run():
    one = parse_line(
        '{"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", '
        '"body": {"model": "m", "input": "hello"}}',
        1,
    )
    many = parse_line(
        '{"custom_id": "e2", "url": "/v1/embeddings", "body": {"input": ["a", "b"]}}', 2
    )
    assert one.embeddings and one.inputs == ("hello",) and one.single_input and one.model == "m"
    assert one.encoding_format == "float"  # OpenAI's default, so the body is what OpenAI gives
    assert many.inputs == ("a", "b") and not many.single_input
    assert one.input_fp != parse_line('{"custom_id": "e1", "prompt": "hello"}', 1).input_fp


def test_native_input_lines_need_the_embeddings_option():
    item = parse_line('{"custom_id": "n", "input": "text"}', 3, embeddings=True)
    assert item.embeddings and item.encoding_format is None  # native: vectors, any encoding
    refused = parse_line('{"custom_id": "n", "input": "text"}', 3)
    assert refused.kind == "missing_prompt" and "embeddings=True" in refused.message
    chat = parse_line('{"custom_id": "c", "prompt": "hi"}', 4, embeddings=True)
    assert not chat.embeddings and chat.messages[0]["content"] == "hi"


@pytest.mark.parametrize(
    ("body", "kind", "words"),
    [
        ('{"input": []}', "missing_prompt", "non-empty"),
        ('{"input": ["a", ""]}', "missing_prompt", "empty text"),
        ('{"input": [1, 2, 3]}', "unsupported", "token arrays"),
        ('{"input": "a", "dimensions": 8}', "unsupported", "dimensions"),
        ('{"input": "a", "encoding_format": "hex"}', "invalid_settings", "encoding_format"),
        ('{"input": "a", "model": 3}', "invalid_settings", "model"),
        ('{"input": ["a"], "user": "u"}', None, None),
    ],
)
def test_bad_embedding_lines(body, kind, words):
    entry = parse_line(f'{{"custom_id": "e", "url": "/v1/embeddings", "body": {body}}}', 5)
    if kind is None:
        assert entry.embeddings
        return
    assert isinstance(entry, InputError) and entry.kind == kind and words in entry.message


def test_too_many_inputs_on_one_line():
    texts = json.dumps(["t"] * (MAX_EMBEDDING_INPUTS + 1))
    entry = parse_line(f'{{"custom_id": "e", "input": {texts}}}', 1, embeddings=True)
    assert entry.kind == "too_large"


def test_chat_template_kwargs_on_a_line_are_part_of_what_it_asks():
    plain = parse_line('{"custom_id": "a", "prompt": "x"}', 1)
    kw = parse_line(
        '{"custom_id": "a", "prompt": "x", "chat_template_kwargs": {"enable_thinking": false}}', 1
    )
    assert kw.chat_template_kwargs == {"enable_thinking": False}
    assert kw.input_fp != plain.input_fp
    bad = parse_line('{"custom_id": "a", "prompt": "x", "chat_template_kwargs": [1]}', 1)
    assert bad.kind == "invalid_settings" and "chat_template_kwargs" in bad.message


def test_scan_input_finds_embedding_lines(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"prompt": "a"}\n\n{"prompt": "What does POST /v1/embeddings return?"}')
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        '{"prompt": "a"}\n{"url": "/v1/embeddings", "body": {"input": "x"}}\n'
        '{"url": "\\u002fv1\\u002fembeddings", "body": {"input": "escaped"}}\n'
    )
    assert scan_input(chat) == (3, 0, 2)  # a prompt that names the url is a chat line
    assert scan_input(mixed) == (3, 2, 1)  # an escaped url is still the url
