"""The batch flow writing OpenAI Batch output against a real llama-server: every line fits OpenAI's
shape, failed lines are in the errors file, and a rerun resumes from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletion

from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from tests.flows.conftest import flow_run_record
from tests.flows.test_batch_flow import save_block, write_input
from tests.openai_batch import read_openai_lines

pytestmark = pytest.mark.integration


async def test_openai_output_lines_errors_file_and_resume(server, registered_block_type, tmp_path):
    name = await save_block("batch-openai", server)
    extra = [
        "{not json",
        json.dumps({"custom_id": "ctx", "prompt": "word " * 3000, "max_tokens": 4}),
    ]
    source = write_input(tmp_path / "in.jsonl", 4, extra)
    target = tmp_path / "out.jsonl"
    errors = Path(str(target) + ".errors.jsonl")

    state = await llamacpp_batch_flow(
        str(source),
        str(target),
        server=name,
        output_format="openai",
        return_state=True,
        request={"max_tokens": 6},
    )
    assert state.is_completed(), state.message
    summary = await state.aresult()
    assert summary.succeeded == 4 and summary.errors_path == str(errors)

    lines = {line.custom_id: line for line in read_openai_lines(target)}
    assert set(lines) == {"q0", "q1", "q2", "q3", "line-5", "ctx"}
    for custom_id in ("q0", "q1", "q2", "q3"):
        line = lines[custom_id]
        assert line.error is None and line.response.status_code == 200
        completion = ChatCompletion.model_validate(line.response.body)
        assert completion.usage.completion_tokens == line.llamacpp["usage"]["completion_tokens"]
        assert completion.choices[0].message.content is not None
    assert lines["line-5"].error.code == "invalid_json" and lines["line-5"].response is None
    assert lines["ctx"].error.code == "bad_request" and "context" in lines["ctx"].error.message
    # The server answered 400: its status and error body are there, and the error is set.
    assert lines["ctx"].response.status_code == 400 and lines["ctx"].error.code == "bad_request"
    assert "context" in json.dumps(lines["ctx"].response.body)

    failed = read_openai_lines(errors)
    assert {line.custom_id: line.error.code for line in failed} == {
        "line-5": "invalid_json",
        "ctx": "bad_request",
    }
    assert {line.id for line in failed} == {lines["line-5"].id, lines["ctx"].id}

    record = await flow_run_record(state.state_details.flow_run_id)
    summary_artifact = next(a for a in record["artifacts"] if a.key == "llamacpp-batch-summary")
    assert f"| Failed lines (errors file) | {errors} |" in summary_artifact.data

    # A rerun sends nothing for the answered ids, retries the failed request, and does not
    # write the input error again.
    async with LlamaCppClient(server.url, api_key=None) as client:
        before = (await client.get_metrics())["tokens_predicted_total"]
        rerun = await llamacpp_batch_flow(
            str(source), str(target), server=name, output_format="openai", request={"max_tokens": 6}
        )
        assert (await client.get_metrics())["tokens_predicted_total"] == before
    assert rerun.skipped_done == 4 and rerun.succeeded == 0
    assert rerun.failed_by_kind == {"invalid_json": 1, "bad_request": 1}
    after = read_openai_lines(target)
    assert len(after) == 7 and after[-1].custom_id == "ctx"
    assert [line.custom_id for line in read_openai_lines(errors)] == ["line-5", "ctx", "ctx"]

    # The native format on this ledger is refused before anything is sent.
    refused = await llamacpp_batch_flow(str(source), str(target), server=name, return_state=True)
    assert refused.is_failed() and "--output-format openai" in refused.message
    assert len(read_openai_lines(target)) == 7


def test_the_cli_asks_for_the_format_by_name(monkeypatch, capsys):
    from prefect_llamacpp.flows import batch as cli

    asked = {}

    class Done:
        def is_failed(self):
            return False

        async def aresult(self):
            return cli.BatchSummary(
                input_path="in",
                output_path="out",
                server="s",
                base_url="u",
                model="m",
                concurrency=1,
                output_format=asked["output_format"],
            )

    async def fake_flow(*args, **kwargs):
        asked.update(kwargs)
        return Done()

    monkeypatch.setattr(cli, "llamacpp_batch_flow", fake_flow)
    assert cli.main(["in.jsonl", "out.jsonl", "--output-format", "openai"]) == 0
    assert asked["output_format"] == "openai"
    assert cli.main(["in.jsonl", "out.jsonl"]) == 0 and asked["output_format"] == "native"
    assert cli.main(["in.jsonl", "out.jsonl", "--output-format", "jsonl"]) == 2
    assert "--output-format: Input should be 'native' or 'openai'" in capsys.readouterr().err
