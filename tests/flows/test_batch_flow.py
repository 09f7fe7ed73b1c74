"""The batch flow against real llama-servers: complete, resumable, bounded, and honest about faults."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

from harness.models import ensure_model
from harness.server import LlamaServer
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from tests.conftest import SECRET_KEY
from tests.flows.conftest import flow_run_record

pytestmark = pytest.mark.integration

REVIEW_SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "recommend": {"type": "boolean"},
    },
    "required": ["sentiment", "stars", "recommend"],
    "additionalProperties": False,
}


def write_input(
    path: Path, count: int, extra: list[str] | None = None, prompt="Question {i}"
) -> Path:
    with open(path, "w") as out:
        for i in range(count):
            out.write(json.dumps({"custom_id": f"q{i}", "prompt": prompt.format(i=i)}) + "\n")
        for line in extra or []:
            out.write(line + "\n")
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def successes(records: list[dict]) -> Counter:
    return Counter(r["custom_id"] for r in records if r["error"] is None)


async def save_block(name: str, server: LlamaServer, api_key: str | None = None) -> str:
    await LlamaCppServer(base_url=server.openai_base, api_key=api_key, timeout=5).save(
        name, overwrite=True
    )
    return name


async def max_requests_seen(server: LlamaServer, stop: asyncio.Event) -> float:
    """Poll /metrics while a batch runs: the most requests the server held at once."""
    seen = 0.0
    async with LlamaCppClient(server.url, api_key=None) as client:
        while not stop.is_set():
            metrics = await client.get_metrics()
            seen = max(seen, metrics["requests_processing"] + metrics["requests_deferred"])
            await asyncio.sleep(0.01)
    return seen


async def wait_for_lines(target: Path, count: int, run: asyncio.Task) -> None:
    """Wait until the ledger holds `count` lines while `run` is still going."""
    while not target.exists() or len(target.read_text().splitlines()) < count:
        assert not run.done(), f"the batch finished before {count} results were written"
        await asyncio.sleep(0.01)


async def test_a_few_hundred_prompts_each_get_exactly_one_line(
    server, registered_block_type, tmp_path
):
    name = await save_block("batch-main", server)
    source = write_input(tmp_path / "in.jsonl", 300)
    target = tmp_path / "out.jsonl"
    stop = asyncio.Event()
    watcher = asyncio.create_task(max_requests_seen(server, stop))
    state = await llamacpp_batch_flow(
        str(source),
        str(target),
        server=name,
        return_state=True,
        request={"max_tokens": 12},
        run={"concurrency": 3, "chunk_size": 50},
    )
    stop.set()
    most_at_once = await watcher
    assert state.is_completed(), state.message
    summary = await state.aresult()
    records = read_output(target)
    assert len(records) == 300
    assert successes(records) == Counter({f"q{i}": 1 for i in range(300)})
    assert all(r["model"] == "tiny" and r["usage"]["completion_tokens"] > 0 for r in records)
    assert summary.succeeded == 300 and summary.failed == 0
    assert summary.completion_tokens == sum(r["usage"]["completion_tokens"] for r in records)
    assert summary.chunks == 6  # Prefect sees chunks, not prompts
    assert summary.max_in_flight == 3
    assert most_at_once <= 3, "the server saw more requests than the concurrency setting"

    record = await flow_run_record(state.state_details.flow_run_id)
    keys = {artifact.key for artifact in record["artifacts"]}
    assert {"llamacpp-batch-summary", "llamacpp-batch-progress"} <= keys
    summary_artifact = next(a for a in record["artifacts"] if a.key == "llamacpp-batch-summary")
    assert "| Succeeded | 300 |" in summary_artifact.data


async def test_default_concurrency_is_total_slots_plus_queue_depth(
    server, registered_block_type, tmp_path
):
    name = await save_block("batch-main", server)
    source = write_input(tmp_path / "in.jsonl", 24)
    summary = await llamacpp_batch_flow(
        str(source), str(tmp_path / "out.jsonl"), server=name, request={"max_tokens": 8}
    )
    assert summary.concurrency == 4 + 1 and summary.succeeded == 24


async def test_structured_output_gives_validated_objects(server, registered_block_type, tmp_path):
    name = await save_block("batch-main", server)
    source = write_input(tmp_path / "in.jsonl", 20, prompt="Review number {i}: it was fine.")
    target = tmp_path / "out.jsonl"
    summary = await llamacpp_batch_flow(
        str(source),
        str(target),
        server=name,
        request={"output_schema": REVIEW_SCHEMA, "max_tokens": 200},
    )
    records = read_output(target)
    assert summary.succeeded == 20, [r["error"] for r in records if r["error"]]
    for record in records:
        output = record["output"]
        assert set(output) == {"sentiment", "stars", "recommend"}
        assert output["sentiment"] in ("positive", "negative", "neutral")
        assert 1 <= output["stars"] <= 5 and isinstance(output["recommend"], bool)


async def test_openai_batch_lines_and_bad_lines(server, registered_block_type, tmp_path):
    name = await save_block("batch-main", server)
    openai_line = {
        "custom_id": "openai-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            "max_tokens": 5,
            "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"schema": REVIEW_SCHEMA}},
        },
    }
    extra = [
        "{not json",
        json.dumps({"custom_id": "q1", "prompt": "again"}),  # duplicate of line 2
        json.dumps({"custom_id": "no-prompt"}),
        json.dumps({"prompt": "I have no id"}),
        json.dumps(openai_line | {"body": openai_line["body"] | {"max_tokens": 200}}),
        json.dumps({"custom_id": "ctx", "prompt": "word " * 3000, "max_tokens": 4}),
    ]
    source = write_input(tmp_path / "in.jsonl", 5, extra)
    target = tmp_path / "out.jsonl"
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 8}
    )
    by_line = {r["line"]: r for r in read_output(target)}
    assert (
        by_line[6]["error"]["kind"] == "invalid_json" and "line 6" in by_line[6]["error"]["message"]
    )
    assert by_line[7]["error"]["kind"] == "duplicate_id"
    assert "line 7" in by_line[7]["error"]["message"] and "line 2" in by_line[7]["error"]["message"]
    assert (
        by_line[8]["error"]["kind"] == "missing_prompt" and by_line[8]["custom_id"] == "no-prompt"
    )
    assert by_line[9]["custom_id"] == "line-9" and by_line[9]["error"] is None
    assert isinstance(by_line[10]["output"], dict)  # the per-line response_format
    assert by_line[11]["error"]["kind"] == "bad_request"
    assert "context" in by_line[11]["error"]["message"]
    assert all(by_line[n]["error"] is None for n in range(1, 6))
    assert summary.succeeded == 7
    assert summary.failed_by_kind == {
        "invalid_json": 1,
        "duplicate_id": 1,
        "missing_prompt": 1,
        "bad_request": 1,
    }

    rerun = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 8}
    )
    assert rerun.skipped_done == 7
    after = read_output(target)
    # Input errors are not written again; the context error is retried (and fails again).
    assert len(after) == len(by_line) + 1
    assert successes(after) == successes(list(by_line.values()))


async def test_identical_prompts_are_each_answered(server, registered_block_type, tmp_path):
    name = await save_block("batch-main", server)
    source = write_input(tmp_path / "in.jsonl", 12, prompt="The same prompt")
    async with LlamaCppClient(server.url, api_key=None) as client:
        before = (await client.get_metrics())["tokens_predicted_total"]
        summary = await llamacpp_batch_flow(
            str(source),
            str(tmp_path / "out.jsonl"),
            server=name,
            request={"max_tokens": 6, "temperature": 1.0},
        )
        grown = (await client.get_metrics())["tokens_predicted_total"] - before
    assert summary.succeeded == 12
    # The server generated every answer: nothing was served from a cache.
    assert grown == summary.completion_tokens > 12


@pytest.fixture
def own_server(llama_server_bin, tiny_model, tmp_path):
    """A server this test may kill and restart (on the same port)."""
    server = LlamaServer(
        tiny_model, ["-np", "4", "--alias", "tiny"], binary=llama_server_bin, log_dir=tmp_path
    )
    with server:
        yield server


async def test_server_killed_mid_batch_then_rerun_loses_and_repeats_nothing(
    own_server, registered_block_type, tmp_path
):
    server = own_server
    name = await save_block("batch-crash", server)
    source = write_input(tmp_path / "in.jsonl", 400)
    target = tmp_path / "out.jsonl"
    run = asyncio.create_task(
        llamacpp_batch_flow(
            str(source),
            str(target),
            server=name,
            return_state=True,
            request={"max_tokens": 48},
            run={"ready_timeout": 2, "chunk_size": 40},
        )
    )
    await wait_for_lines(target, 60, run)
    server.kill()
    state = await run
    assert state.is_failed()
    assert "rerun" in state.message
    first_run = target.read_bytes()
    done_before = successes(read_output(target))
    assert 60 <= sum(done_before.values()) < 400
    assert set(done_before.values()) == {1}

    server.start()
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 48}
    )
    assert target.read_bytes().startswith(first_run), "finished results were rewritten"
    assert summary.skipped_done == sum(done_before.values())
    assert summary.succeeded == 400 - summary.skipped_done
    final = successes(read_output(target))
    assert final == Counter({f"q{i}": 1 for i in range(400)})


async def test_server_back_within_the_deadline_finishes_in_one_run(
    own_server, registered_block_type, tmp_path
):
    server = own_server
    name = await save_block("batch-restart", server)
    source = write_input(tmp_path / "in.jsonl", 300)
    target = tmp_path / "out.jsonl"
    run = asyncio.create_task(
        llamacpp_batch_flow(
            str(source),
            str(target),
            server=name,
            request={"max_tokens": 48},
            run={"ready_timeout": 60},
        )
    )
    await wait_for_lines(target, 40, run)
    server.kill()
    await asyncio.sleep(3)  # longer than the per-prompt retries: the run must wait at the gate
    server.start()
    summary = await run
    # The run saw the server go (a dropped request or a refused one, depending on where the kill
    # fell; crash counting has its own test in test_batch_hardening) and waited for it.
    assert summary.server_waits >= 1, summary
    assert successes(read_output(target)) == Counter({f"q{i}": 1 for i in range(300)})


async def test_truncated_last_line_is_dropped_and_redone(server, registered_block_type, tmp_path):
    name = await save_block("batch-main", server)
    source = write_input(tmp_path / "in.jsonl", 10)
    target = tmp_path / "out.jsonl"
    await llamacpp_batch_flow(str(source), str(target), server=name, request={"max_tokens": 6})
    lines = target.read_text().splitlines()
    cut = "\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2]  # a crash mid-write
    target.write_text(cut)
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 6}
    )
    assert summary.skipped_done == 9 and summary.succeeded == 1
    assert successes(read_output(target)) == Counter({f"q{i}": 1 for i in range(10)})


async def test_wrong_key_fails_before_any_prompt(key_server, registered_block_type, tmp_path):
    name = await save_block("batch-locked", key_server, api_key="not-the-key")
    source = write_input(tmp_path / "in.jsonl", 5)
    target = tmp_path / "out.jsonl"
    state = await llamacpp_batch_flow(str(source), str(target), server=name, return_state=True)
    assert state.is_failed()
    assert "unauthorized" in state.message and "LLAMACPP_API_KEY" in state.message
    assert "No prompt was sent" in state.message
    assert not target.exists()


async def test_right_key_runs_and_is_never_recorded(key_server, registered_block_type, tmp_path):
    name = await save_block("batch-secure", key_server, api_key=SECRET_KEY)
    source = write_input(tmp_path / "in.jsonl", 6)
    target = tmp_path / "out.jsonl"
    state = await llamacpp_batch_flow(
        str(source), str(target), server=name, return_state=True, request={"max_tokens": 6}
    )
    assert state.is_completed(), state.message
    record = await flow_run_record(state.state_details.flow_run_id)
    assert len(read_output(target)) == 6
    for text in (record["text"], target.read_text(), str(await state.aresult())):
        assert SECRET_KEY not in text


async def test_waits_for_a_loading_server_then_runs(
    llama_server_bin, registered_block_type, tmp_path
):
    server = LlamaServer(
        ensure_model("slow-load"),
        ["-lm", "none", "-np", "2", "--alias", "slow"],
        binary=llama_server_bin,
        log_dir=tmp_path,
    )
    server.start(wait="listening")
    try:
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{server.url}/health")).status_code == 503
        name = await save_block("batch-loading", server)
        source = write_input(tmp_path / "in.jsonl", 4)
        summary = await llamacpp_batch_flow(
            str(source),
            str(tmp_path / "out.jsonl"),
            server=name,
            request={"max_tokens": 4},
            run={"ready_timeout": 120},
        )
        assert summary.succeeded == 4 and summary.model == "slow"
    finally:
        server.stop()


async def test_missing_input_file_is_a_clear_error(registered_block_type, tmp_path):
    state = await llamacpp_batch_flow(
        str(tmp_path / "nope.jsonl"), str(tmp_path / "out.jsonl"), return_state=True
    )
    assert state.is_failed() and "does not exist" in state.message


async def test_answer_cut_short_is_a_validation_error_line(server, registered_block_type, tmp_path):
    name = await save_block("batch-main", server)
    source = write_input(tmp_path / "in.jsonl", 3)
    target = tmp_path / "out.jsonl"
    summary = await llamacpp_batch_flow(
        str(source),
        str(target),
        server=name,
        request={"output_schema": REVIEW_SCHEMA, "max_tokens": 3},
    )
    assert summary.failed_by_kind == {"validation": 3}
    for record in read_output(target):
        assert record["error"]["kind"] == "validation"
        assert "cut off at max_tokens" in record["error"]["message"]
        assert record["usage"]["completion_tokens"] == 3
