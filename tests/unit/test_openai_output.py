"""The OpenAI Batch output format: lines that fit OpenAI's shape, an errors file that holds every
failed line even after a crash, resume from it, and refusals that name the fix."""

from __future__ import annotations

import json
import os

import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from prefect_llamacpp.batch.jsonl_input import BatchItem
from prefect_llamacpp.batch.ledger import Ledger, RunSettings, read_ledger
from prefect_llamacpp.batch.openai_output import read_openai_line, render_openai_line
from prefect_llamacpp.batch.records import result_line
from prefect_llamacpp.exceptions import BatchPathError, LedgerFormatError, LedgerInUseError
from tests.openai_batch import OpenAIBatchOutputLine, read_openai_lines

SETTINGS = RunSettings(model="tiny", max_tokens=16)


def chat_body(text: str = "Hello there") -> dict:
    """A chat completion as llama-server sends it (its extra `timings` included)."""
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1764133200,
        "model": "tiny",
        "system_fingerprint": "b1-0c1e570",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": text, "reasoning_content": "hmm"},
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        "timings": {"prompt_n": 9, "predicted_n": 3},
    }


CONTEXT_ERROR = {
    "error": {
        "code": 400,
        "message": "the request exceeds the available context size",
        "type": "exceed_context_size_error",
    }
}


def item(custom_id: str, prompt: str = "hello", line: int = 1) -> BatchItem:
    return BatchItem(custom_id, line, [{"role": "user", "content": prompt}])


def success(entry: BatchItem, text: str = "Hello there"):
    return result_line(
        entry.custom_id,
        entry.line,
        output=text,
        reasoning="hmm",
        usage={"prompt_tokens": 9, "completion_tokens": 3},
        model="tiny",
        attempts=1,
        latency_s=0.25,
        input_fp=entry.input_fp,
        settings_fp=SETTINGS.fingerprint,
        response={"status_code": 200, "body": chat_body(text)},
    )


def http_failure(entry: BatchItem):
    return result_line(
        entry.custom_id,
        entry.line,
        error=("bad_request", f"line {entry.line}: the prompt exceeds the context"),
        attempts=1,
        input_fp=entry.input_fp,
        settings_fp=SETTINGS.fingerprint,
        response={"status_code": 400, "body": CONTEXT_ERROR},
    )


def input_error(custom_id: str, line: int):
    return result_line(custom_id, line, error=("invalid_json", f"line {line}: not JSON"))


def open_openai(path, source=None) -> Ledger:
    ledger = Ledger.open(path, source, output_format="openai")
    ledger.check_settings(SETTINGS)
    return ledger


def errors_file(path):
    return path.with_name(path.name + ".errors.jsonl")


# -- the line ---------------------------------------------------------------------------------


def test_a_success_is_an_openai_line_with_the_servers_body_and_our_facts_apart():
    record = success(item("a", line=3))
    line = render_openai_line(record)
    parsed = OpenAIBatchOutputLine.model_validate(line)
    assert parsed.custom_id == "a" and parsed.error is None
    assert parsed.response.status_code == 200 and parsed.response.body == chat_body()
    completion = ChatCompletion.model_validate(parsed.response.body)
    assert completion.choices[0].message.content == "Hello there"
    facts = line["llamacpp"]
    assert facts["line"] == 3 and facts["input_fp"] == record["input_fp"]
    assert facts["settings_fp"] == SETTINGS.fingerprint and facts["attempts"] == 1
    assert {"usage", "model", "latency_s", "finished_at"} <= set(facts)
    # The answer and the reasoning are in the body; not written twice.
    assert "output" not in facts and "reasoning" not in facts
    assert set(line) == {"id", "custom_id", "response", "error", "llamacpp"}
    assert "response" in record, "the record itself is left as it is"


def test_an_http_error_keeps_its_status_and_body_and_sets_error():
    line = render_openai_line(http_failure(item("ctx", line=4)))
    parsed = OpenAIBatchOutputLine.model_validate(line)
    assert parsed.response.status_code == 400 and parsed.response.body == CONTEXT_ERROR
    assert parsed.error.code == "bad_request" and "context" in parsed.error.message


def test_a_failure_without_an_answer_has_no_response():
    line = render_openai_line(input_error("line-6", 6))
    parsed = OpenAIBatchOutputLine.model_validate(line)
    assert parsed.response is None
    assert parsed.error.code == "invalid_json" and parsed.error.message == "line 6: not JSON"
    assert line["llamacpp"]["line"] == 6


def test_a_success_without_a_response_keeps_its_output_among_our_facts():
    record = result_line("a", 1, output={"stars": 5}, input_fp="x", settings_fp="y")
    line = render_openai_line(record)
    assert line["response"] is None and line["llamacpp"]["output"] == {"stars": 5}


def test_an_embedding_list_is_the_body_as_the_server_sent_it():
    body = {
        "object": "list",
        "model": "tiny",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    record = result_line("e", 1, output=[[0.25, -0.5]], response={"status_code": 200, "body": body})
    parsed = OpenAIBatchOutputLine.model_validate(render_openai_line(record))
    assert CreateEmbeddingResponse.model_validate(parsed.response.body).data[0].embedding == [
        0.25,
        -0.5,
    ]


def test_reading_a_line_back_gives_the_ledgers_view():
    record = http_failure(item("ctx", line=4))
    view = read_openai_line(json.loads(json.dumps(render_openai_line(record))))
    assert view["custom_id"] == "ctx" and view["line"] == 4
    assert view["error"] == {"kind": "bad_request", "message": record["error"]["message"]}
    assert view["input_fp"] == record["input_fp"]


# -- the ledger in this format ----------------------------------------------------------------


def test_every_line_fits_and_failed_ones_are_also_in_the_errors_file(tmp_path):
    path = tmp_path / "out.jsonl"
    with open_openai(path) as ledger:
        assert ledger.errors_path == errors_file(path)
        ledger.write(success(item("a", line=1)))
        ledger.write(http_failure(item("ctx", line=2)))
        ledger.write(input_error("line-3", 3))
        ledger.write(success(item("b", line=4)))
    lines = read_openai_lines(path)
    assert [line.custom_id for line in lines] == ["a", "ctx", "line-3", "b"]
    failed = path.read_bytes().splitlines(keepends=True)[1:3]
    assert errors_file(path).read_bytes() == b"".join(failed)  # the same lines, byte for byte
    assert [line.error.code for line in read_openai_lines(errors_file(path))] == [
        "bad_request",
        "invalid_json",
    ]
    stored = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert stored["output_format"] == "openai"


def test_no_errors_file_when_nothing_failed(tmp_path):
    path = tmp_path / "out.jsonl"
    with open_openai(path) as ledger:
        ledger.write(success(item("a")))
    assert not errors_file(path).exists()


def test_a_rerun_resumes_from_openai_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    done, failed = item("a", "one", 1), item("ctx", "long", 2)
    with open_openai(path) as ledger:
        ledger.write(success(done))
        ledger.write(http_failure(failed))
        ledger.write(input_error("line-3", 3))
        changed = item("c", "CHANGED", 4)
        ledger.write(
            result_line(
                "c", 4, error=("ledger_mismatch", "line 4: changed"), input_fp=changed.input_fp
            )
        )
    with open_openai(path) as ledger:
        assert ledger.state.formats == {"openai"}
        assert ledger.state.written_mismatches == {("c", changed.input_fp)}
        assert ledger.is_done("a", done.input_fp) is True
        assert ledger.is_done("a", item("a", "CHANGED").input_fp) is False
        assert ledger.is_done("ctx", failed.input_fp) is None  # failed: retried
        assert ledger.state.written_input_errors == {("line-3", 3)}
        assert not ledger.write(success(done)), "a second success line is refused"
        assert ledger.write(success(failed))
    assert read_ledger(path).done.keys() == {"a", "ctx"}
    assert len(read_openai_lines(path)) == 5


def test_a_ledger_in_one_format_is_not_resumed_in_the_other(tmp_path):
    native, openai = tmp_path / "native.jsonl", tmp_path / "openai.jsonl"
    with Ledger.open(native) as ledger:
        ledger.write(success(item("a")))
    with open_openai(openai) as ledger:
        ledger.write(success(item("a")))
    before = native.read_bytes(), openai.read_bytes()
    with pytest.raises(LedgerFormatError, match="--output-format native") as info:
        Ledger.open(native, output_format="openai")
    assert "new output path" in str(info.value)
    with pytest.raises(LedgerFormatError, match="--output-format openai"):
        Ledger.open(openai)
    assert (native.read_bytes(), openai.read_bytes()) == before
    assert not errors_file(native).exists()
    with Ledger.open(native), Ledger.open(openai, output_format="openai"):
        pass  # refusing released the lock


def test_an_empty_ledger_takes_either_format(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"")
    (tmp_path / "out.jsonl.settings.json").write_text('{"output_format": "native"}')
    with open_openai(path) as ledger:
        ledger.write(success(item("a")))
    assert read_openai_lines(path)[0].custom_id == "a"


def test_native_lines_are_unchanged_by_the_server_response(tmp_path):
    path = tmp_path / "out.jsonl"
    with Ledger.open(path) as ledger:
        ledger.check_settings(SETTINGS)
        ledger.write(success(item("a")))
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert "response" not in line and "llamacpp" not in line and line["output"] == "Hello there"
    assert not errors_file(path).exists()
    stored = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert stored["fingerprint"] == SETTINGS.fingerprint and stored["output_format"] == "native"


# -- hostile cases ----------------------------------------------------------------------------


def test_a_torn_last_line_is_dropped_and_its_item_runs_again(tmp_path):
    path = tmp_path / "out.jsonl"
    with open_openai(path) as ledger:
        ledger.write(success(item("a")))
    whole = path.read_bytes()
    torn = json.dumps(render_openai_line(success(item("b"))))[:80]
    path.write_bytes(whole + torn.encode())
    with open_openai(path) as ledger:
        assert ledger.state.dropped_partial_line and set(ledger.state.done) == {"a"}
    assert path.read_bytes() == whole


def test_a_crash_between_the_two_writes_is_caught_up_on_open(tmp_path):
    path = tmp_path / "out.jsonl"
    with open_openai(path) as ledger:
        ledger.write(http_failure(item("x", line=1)))
        ledger.write(http_failure(item("y", line=2)))
        ledger.write(input_error("line-3", 3))
    complete = errors_file(path).read_bytes()
    first, second, _ = complete.splitlines(keepends=True)
    errors_file(path).write_bytes(first + second[:40])  # torn in the errors file, whole in output
    with open_openai(path):
        pass
    assert errors_file(path).read_bytes() == complete
    errors_file(path).unlink()  # removed by hand: rebuilt from the ledger
    with open_openai(path):
        pass
    assert errors_file(path).read_bytes() == complete


def test_an_id_with_a_lone_surrogate_is_written_to_both_files(tmp_path):
    path = tmp_path / "out.jsonl"
    custom_id = "a\ud800"
    with open_openai(path) as ledger:
        ledger.write(success(item(custom_id)))
        ledger.write(input_error("b\udfff", 2))
    assert read_ledger(path).done.keys() == {custom_id}
    assert json.loads(errors_file(path).read_bytes())["custom_id"] == "b\udfff"
    assert len(path.read_bytes().splitlines()) == 2


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    with open_openai(path) as ledger:
        ledger.write(input_error("line-1", 1))
        with pytest.raises(LedgerInUseError, match="in use by another batch run"):
            Ledger.open(path, output_format="openai")
        ledger.write(input_error("line-2", 2))
    assert len(errors_file(path).read_bytes().splitlines()) == 2


def test_the_input_is_never_the_errors_file(tmp_path):
    source = errors_file(tmp_path / "out.jsonl")
    source.write_text('{"prompt": "mine"}\n')
    with pytest.raises(BatchPathError, match="same file"):
        Ledger.open(tmp_path / "out.jsonl", source, output_format="openai")
    assert source.read_text() == '{"prompt": "mine"}\n'
    assert not (tmp_path / "out.jsonl").exists()
    # The errors file linked to the output itself would interleave the two.
    errors_file(tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    with pytest.raises(BatchPathError, match="is the output"):
        Ledger.open(tmp_path / "loop.jsonl", output_format="openai")
    os.unlink(errors_file(tmp_path / "loop.jsonl"))


def test_an_errors_file_left_by_a_removed_output_is_rebuilt_from_the_new_one(tmp_path):
    path = tmp_path / "out.jsonl"
    with open_openai(path) as ledger:
        ledger.write(input_error("old-bad", 1))
    path.unlink()  # starting over: the output and its settings removed, the errors file left
    (tmp_path / "out.jsonl.settings.json").unlink()

    with open_openai(path) as ledger:
        ledger.write(success(item("ok")))
    assert not errors_file(path).exists()  # the new output has no failed line

    with open_openai(path) as ledger:
        ledger.write(http_failure(item("ctx", line=2)))
    path.unlink()
    (tmp_path / "out.jsonl.settings.json").unlink()
    with open_openai(path) as ledger:
        ledger.write(input_error("new-bad", 3))
    assert [line.custom_id for line in read_openai_lines(errors_file(path))] == ["new-bad"]
