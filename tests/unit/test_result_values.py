"""Values from the server reach the output as the server sent them (review repros, as tests)."""

from __future__ import annotations

import json

from prefect_llamacpp.batch.jsonl_input import BatchItem
from prefect_llamacpp.batch.ledger import Ledger
from prefect_llamacpp.batch.runner import BatchOptions, BatchRunner
from prefect_llamacpp.config import LlamaCppSettings
from tests.fake_llama import FakeLlamaServer, completion


async def one_line(tmp_path, answer, output_format="native", **options) -> dict:
    output = tmp_path / "out.jsonl"
    item = BatchItem("a", 1, [{"role": "user", "content": "hi"}])
    options = {"concurrency": 1, "ready_timeout": 5, **options}
    with Ledger.open(output, None, output_format=output_format) as ledger:
        async with FakeLlamaServer(answer) as server:
            runner = BatchRunner(
                LlamaCppSettings(base_url=server.url, timeout=5),
                "fake",
                BatchOptions.of(**options, keep_responses=output_format == "openai"),
                on_results=ledger.write_all,
            )
            try:
                await runner.run([item])
            finally:
                await runner.aclose()
    (line,) = output.read_bytes().splitlines()
    return json.loads(line)


async def test_an_integer_past_64_bits_in_an_answer_stays_an_integer(tmp_path):
    big = 2**64 + 1  # a proxy's id or a timestamp in ns

    def answer(request):
        status, headers, body = completion()
        return status, headers, {**body, "created": big}

    line = await one_line(tmp_path, answer, "openai")
    assert line["response"]["body"]["created"] == big


async def test_a_structured_number_too_large_for_a_float_is_not_written_as_null(tmp_path):
    # 1e999 is a valid JSON number (a JSON grammar allows it); Python reads it as infinity.
    schema = {"type": "object", "properties": {"x": {"type": "number"}}}
    line = await one_line(
        tmp_path, lambda request: completion('{"x": 1e999}'), output_schema=schema
    )
    assert line["error"] is None and line["output"] == {"x": float("inf")}
