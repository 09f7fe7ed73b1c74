"""Embedding lines and chat template variables through the batch flow, on real llama-servers."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest

from harness.server import LlamaServer
from prefect_llamacpp.batch.jsonl_input import BatchItem
from prefect_llamacpp.exceptions import NotSupportedError
from prefect_llamacpp.flows.batch import _chunked, llamacpp_batch_flow
from tests.flows.test_batch_flow import read_output, save_block, successes

pytestmark = pytest.mark.integration


def n_embd(server) -> int:
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    return models["data"][0]["meta"]["n_embd"]


def write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def openai_embedding(custom_id: str, text) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"input": text},
    }


async def test_a_few_thousand_inputs_one_vector_line_each_and_a_rerun_resumes(
    embedding_server, tmp_path
):
    block = await save_block("embed", embedding_server)
    count = 2000
    source = write_lines(
        tmp_path / "docs.jsonl",
        [
            {"custom_id": f"d{i}", "input": f"document number {i} about topic {i % 7}"}
            for i in range(count)
        ],
    )
    output = tmp_path / "vectors.jsonl"

    summary = await llamacpp_batch_flow(
        str(source),
        str(output),
        server=block,
        request={"embeddings": True},
        run={"embedding_batch": 32, "chunk_size": 30},
    )

    assert (summary.succeeded, summary.failed) == (count, 0)
    # chunk_size counts requests: 2,000 texts packed 32 to a request are 62.5 requests, 3 chunks.
    assert summary.chunks == 3
    records = read_output(output)
    assert len(records) == count and set(successes(records).values()) == {1}
    dimension = n_embd(embedding_server)
    for record in records:
        vector = record["output"]
        assert len(vector) == dimension and all(math.isfinite(x) for x in vector)
        assert record["usage"]["prompt_tokens"] > 0
    # Shares of a packed request add up to what the server counted for the whole run.
    assert summary.prompt_tokens == sum(r["usage"]["prompt_tokens"] for r in records)

    again = await llamacpp_batch_flow(
        str(source),
        str(output),
        server=block,
        request={"embeddings": True},
        run={"embedding_batch": 32},
    )
    assert (again.succeeded, again.skipped_done) == (0, count)
    assert len(read_output(output)) == count


async def test_mixed_file_chat_and_embeddings_packed_vectors_match_single_ones(
    embedding_server, tmp_path
):
    block = await save_block("embed", embedding_server)
    texts = [f"the quick brown fox number {i}" for i in range(10)]
    lines = [{"custom_id": f"chat{i}", "prompt": f"Say {i}"} for i in range(3)]
    lines += [openai_embedding(f"e{i}", text) for i, text in enumerate(texts)]
    lines.append(openai_embedding("pair", ["alpha beta", "gamma delta"]))
    source = write_lines(tmp_path / "mixed.jsonl", lines)

    packed = await llamacpp_batch_flow(
        str(source), str(tmp_path / "packed.jsonl"), server=block, request={"max_tokens": 4}
    )
    single = await llamacpp_batch_flow(
        str(source),
        str(tmp_path / "single.jsonl"),
        server=block,
        request={"max_tokens": 4},
        run={"embedding_batch": 1},
    )

    assert packed.failed == single.failed == 0
    by_id = {r["custom_id"]: r for r in read_output(tmp_path / "packed.jsonl")}
    alone = {r["custom_id"]: r for r in read_output(tmp_path / "single.jsonl")}
    assert all(isinstance(by_id[f"chat{i}"]["output"], str) for i in range(3))
    assert by_id["chat0"]["usage"]["completion_tokens"] == 4
    for i in range(10):
        assert by_id[f"e{i}"]["output"] == pytest.approx(alone[f"e{i}"]["output"], abs=1e-4)
    pair = by_id["pair"]["output"]
    assert len(pair) == 2 and len(pair[0]) == n_embd(embedding_server)


async def test_a_text_too_long_fails_alone_and_its_pack_mates_succeed(embedding_server, tmp_path):
    block = await save_block("embed", embedding_server)
    lines = [openai_embedding(f"e{i}", f"short text {i}") for i in range(5)]
    lines.insert(2, openai_embedding("huge", "word " * 5000))
    source = write_lines(tmp_path / "long.jsonl", lines)

    summary = await llamacpp_batch_flow(str(source), str(tmp_path / "out.jsonl"), server=block)

    records = {r["custom_id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert summary.succeeded == 5 and summary.failed_by_kind == {"bad_request": 1}
    assert "--ubatch-size" in records["huge"]["error"]["message"]
    assert all(records[f"e{i}"]["error"] is None for i in range(5))


async def test_a_server_without_embeddings_is_refused_before_anything_is_sent(server, tmp_path):
    block = await save_block("plain", server)
    source = write_lines(
        tmp_path / "in.jsonl", [openai_embedding(f"e{i}", "text") for i in range(3)]
    )
    native = write_lines(tmp_path / "native.jsonl", [{"custom_id": "n", "input": "text"}])
    output = tmp_path / "out.jsonl"

    with pytest.raises(NotSupportedError, match="--embeddings"):
        await llamacpp_batch_flow(str(source), str(output), server=block)
    with pytest.raises(NotSupportedError, match="--embeddings"):
        await llamacpp_batch_flow(
            str(native), str(output), server=block, request={"embeddings": True}
        )

    assert not output.exists() or output.read_text() == ""


async def test_in_a_mixed_file_on_a_chat_server_the_chat_lines_still_run(server, tmp_path):
    block = await save_block("plain", server)
    lines = [{"custom_id": "c", "prompt": "hi"}, openai_embedding("e", "text")]
    source = write_lines(tmp_path / "in.jsonl", lines)

    summary = await llamacpp_batch_flow(str(source), str(tmp_path / "out.jsonl"), server=block)

    records = {r["custom_id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert records["c"]["error"] is None and summary.succeeded == 1
    assert records["e"]["error"]["kind"] == "no_server_for_model"
    assert "--embeddings" in records["e"]["error"]["message"]


async def test_chat_template_kwargs_reach_the_template(template_server, tmp_path):
    block = await save_block("echo", template_server)
    source = write_lines(
        tmp_path / "in.jsonl",
        [
            {"custom_id": "plain", "prompt": "hi"},
            {"custom_id": "own", "prompt": "hi", "chat_template_kwargs": {"greeting": "x"}},
        ],
    )
    without = await llamacpp_batch_flow(
        str(source), str(tmp_path / "a.jsonl"), server=block, request={"max_tokens": 1}
    )
    greeting = {"greeting": "hello there " * 20}
    with_kwargs = await llamacpp_batch_flow(
        str(source),
        str(tmp_path / "b.jsonl"),
        server=block,
        request={"max_tokens": 1, "chat_template_kwargs": greeting},
    )

    assert without.failed == with_kwargs.failed == 0
    a = {r["custom_id"]: r["usage"]["prompt_tokens"] for r in read_output(tmp_path / "a.jsonl")}
    b = {r["custom_id"]: r["usage"]["prompt_tokens"] for r in read_output(tmp_path / "b.jsonl")}
    assert b["plain"] > a["plain"] + 20  # the run's greeting was rendered into the prompt
    assert b["own"] == a["own"] > a["plain"]  # a line's own variables win over the run's


async def test_in_a_fleet_embedding_lines_go_only_to_servers_that_serve_them(
    server, embedding_server, tmp_path
):
    plain = await save_block("plain", server)
    embed = await save_block("embed", embedding_server)
    lines = [{"custom_id": f"c{i}", "prompt": f"Say {i}"} for i in range(12)]
    lines += [openai_embedding(f"e{i}", f"text {i}") for i in range(40)]
    source = write_lines(tmp_path / "in.jsonl", lines)

    summary = await llamacpp_batch_flow(
        str(source),
        str(tmp_path / "out.jsonl"),
        server=[plain, embed],
        request={"max_tokens": 4},
        run={"embedding_batch": 4},
    )

    assert (summary.succeeded, summary.failed) == (52, 0)
    records = read_output(tmp_path / "out.jsonl")
    assert {r["server"] for r in records if r["custom_id"].startswith("e")} == {embed}
    assert {r["server"] for r in records if r["custom_id"].startswith("c")} <= {plain, embed}


async def test_an_embeddings_run_waits_for_an_embedding_server_that_is_still_starting(
    server, llama_server_bin, tiny_model, registered_block_type, tmp_path
):
    # The chat server is ready, the only embedding server comes up after the run began: the run
    # does not stop for want of embeddings, and every line is embedded once it joins.
    late = LlamaServer(
        tiny_model,
        ["-np", "2", "-kvu", "--alias", "tiny-late-embed", "--embeddings", "--pooling", "mean"],
        binary=llama_server_bin,
        log_dir=tmp_path,
    )
    plain = await save_block("plain-now", server)
    embed = await save_block("embed-late", late)
    source = write_lines(
        tmp_path / "in.jsonl", [{"custom_id": f"e{i}", "input": f"text {i}"} for i in range(20)]
    )

    async def start_late():
        # Down when the run first looks (its port hangs up on every connection), started once
        # it has looked: not after a fixed pause the run's own start-up could outlast.
        looked = asyncio.Event()

        def hang_up(reader, writer) -> None:
            looked.set()
            writer.close()

        async with await asyncio.start_server(hang_up, "127.0.0.1", late.port):
            await asyncio.wait_for(looked.wait(), 120)
        await asyncio.to_thread(late.start)

    starting = asyncio.create_task(start_late())
    try:
        summary = await llamacpp_batch_flow(
            str(source),
            str(tmp_path / "out.jsonl"),
            server=[plain, embed],
            request={"embeddings": True},
            run={"ready_timeout": 60},
        )
    finally:
        if not starting.done():  # the run ended before it looked: its own error is the news
            starting.cancel()
        (started,) = await asyncio.gather(starting, return_exceptions=True)
        late.stop()
        if isinstance(started, Exception):  # the late server did not start: that is the news
            raise started
    assert (summary.succeeded, summary.failed) == (20, 0)
    assert {r["server"] for r in read_output(tmp_path / "out.jsonl")} == {embed}
    assert {share.server: share.joined_late for share in summary.servers}[embed]


async def test_an_openai_batch_file_of_chat_and_embedding_lines_in_openai_output(
    embedding_server, tmp_path
):
    from openai.types import CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion

    from tests.openai_batch import read_openai_lines

    block = await save_block("embed", embedding_server)
    chat = {"method": "POST", "url": "/v1/chat/completions"}
    lines = [
        {
            "custom_id": f"c{i}",
            **chat,
            "body": {"messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 3},
        }
        for i in range(3)
    ]
    lines += [openai_embedding(f"e{i}", f"text {i}") for i in range(6)]
    lines.append(openai_embedding("pair", ["one", "two"]))
    lines.append(openai_embedding("huge", "word " * 5000))
    lines.append(openai_embedding("bad", []))
    source = write_lines(tmp_path / "batch.jsonl", lines)
    target = tmp_path / "out.jsonl"

    summary = await llamacpp_batch_flow(
        str(source), str(target), server=block, output_format="openai", run={"embedding_batch": 4}
    )

    assert (summary.succeeded, summary.failed) == (10, 2)
    out = {line.custom_id: line for line in read_openai_lines(target)}
    assert set(out) == {line["custom_id"] for line in lines}
    for i in range(3):
        assert ChatCompletion.model_validate(out[f"c{i}"].response.body).choices
    dimension = n_embd(embedding_server)
    for custom_id in [f"e{i}" for i in range(6)] + ["pair"]:
        line = out[custom_id]
        assert line.error is None and line.response.status_code == 200
        body = CreateEmbeddingResponse.model_validate(line.response.body)
        assert [entry.index for entry in body.data] == list(range(len(body.data)))
        assert all(len(entry.embedding) == dimension for entry in body.data)
    assert len(out["pair"].response.body["data"]) == 2
    assert out["huge"].error.code == "bad_request" and out["huge"].response.status_code == 500
    assert out["bad"].error.code == "missing_prompt" and out["bad"].response is None
    failed = {line.custom_id for line in read_openai_lines(Path(summary.errors_path))}
    assert failed == {"huge", "bad"}

    again = await llamacpp_batch_flow(
        str(source), str(target), server=block, output_format="openai", run={"embedding_batch": 4}
    )
    assert (again.succeeded, again.skipped_done, again.failed) == (0, 10, 2)


async def test_a_server_whose_packed_vectors_differ_is_refused_naming_kvu(
    llama_server_bin, tiny_model, tmp_path
):
    from harness.server import LlamaServer
    from prefect_llamacpp.exceptions import BatchAbortedError

    # -np 2 without -kvu: texts of different lengths in one request get other vectors (b1-0c1e570)
    args = ["-np", "2", "--embeddings", "--pooling", "mean"]
    with LlamaServer(tiny_model, args, binary=llama_server_bin, log_dir=tmp_path) as split_kv:
        block = await save_block("split-kv", split_kv)
        source = write_lines(tmp_path / "in.jsonl", [{"custom_id": "d", "input": "text"}])
        output = tmp_path / "out.jsonl"
        with pytest.raises(BatchAbortedError, match="-kvu"):
            await llamacpp_batch_flow(
                str(source), str(output), server=block, request={"embeddings": True}
            )
    assert not output.exists() or output.read_text() == ""


def item(custom_id: str, inputs: tuple[str, ...] | None = None) -> BatchItem:
    messages = [] if inputs else [{"role": "user", "content": "hi"}]
    return BatchItem(custom_id, 1, messages, inputs=inputs)


def test_chunks_count_requests_chat_lines_one_each_embedding_lines_by_pack():
    chat = [item(f"c{i}") for i in range(10)]
    assert [len(c) for c in _chunked(iter(chat), 4, 32)] == [4, 4, 2]
    texts = [item(f"e{i}", ("some text",)) for i in range(100)]
    # 32 one-text lines make one request: a chunk of 2 requests is 64 lines, two full packs.
    assert [len(c) for c in _chunked(iter(texts), 2, 32)] == [64, 36]
    lists = [item(f"l{i}", ("a", "b", "c", "d")) for i in range(10)]  # 4 texts a line
    assert [len(c) for c in _chunked(iter(lists), 1, 8)] == [2] * 5  # 8 texts, one request
    mixed = [item("c0"), item("e0", ("x",)), item("c1")]
    assert [len(c) for c in _chunked(iter(mixed), 2, 32)] == [3]


def test_a_chunk_of_long_documents_ends_at_the_text_limit(monkeypatch):
    monkeypatch.setattr("prefect_llamacpp.flows.batch.CHUNK_TEXT_CHARS", 1000)
    documents = [item(f"d{i}", ("x" * 300,)) for i in range(10)]
    assert [len(c) for c in _chunked(iter(documents), 500, 32)] == [4, 4, 2]
