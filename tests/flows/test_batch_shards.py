"""Shard runs of one batch on one server, run here one after another (the parent's part, with a
work pool and workers, is in tests/e2e/test_shards_across_workers.py): together they answer
every line exactly once; and what a parent refuses before it starts anything."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from tests.flows.test_batch_flow import save_block, write_input
from tests.object_storage import upload


def s3_objects():
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs


async def test_shard_runs_on_one_server_answer_each_line_once(
    server, registered_block_type, s3_bucket, tmp_path
):
    name = await save_block("shards-one", server)
    lines = write_input(tmp_path / "in.jsonl", 90, extra=["not json", '{"prompt": "no id"}'])
    source = upload(lines, f"s3://{s3_bucket}/in.jsonl")
    answered: Counter = Counter()
    for k in (1, 2, 3):
        output = f"s3://{s3_bucket}/out.jsonl.shards/{k}-of-3.jsonl"
        summary = await llamacpp_batch_flow(
            source, output, server=name, request={"max_tokens": 4}, shard=f"{k}/3"
        )
        assert 15 < summary.succeeded < 45, summary  # about a third each
        answered.update(
            json.loads(line)["custom_id"] for line in s3_objects().cat_file(output).splitlines()
        )
        assert s3_objects().exists(output + ".summary.json")  # what the parent reads
    assert answered == Counter({**{f"q{i}": 1 for i in range(90)}, "line-91": 1, "line-92": 1})


@pytest.mark.parametrize(
    ("source", "output", "words"),
    [
        ("local", "s3", "needs its input and output on storage every worker reaches"),
        ("s3", "local", "needs its input and output on storage every worker reaches"),
        ("s3", "s3", "starts its shards on a deployment of the batch flow"),
    ],
)
async def test_a_sharded_batch_is_refused_before_anything_starts(
    server, registered_block_type, s3_bucket, tmp_path, source, output, words
):
    name = await save_block("shards-refused", server)
    local = write_input(tmp_path / "in.jsonl", 3)
    places = {
        "local": (str(local), str(tmp_path / "out.jsonl")),
        "s3": (upload(local, f"s3://{s3_bucket}/in.jsonl"), f"s3://{s3_bucket}/out.jsonl"),
    }
    with pytest.raises(ConfigurationError, match=words):
        await llamacpp_batch_flow(
            places[source][0], places[output][1], server=name, run={"shards": 3}
        )
    assert not s3_objects().exists(f"{s3_bucket}/out.jsonl.shards")


@pytest.mark.parametrize("shard", ["3", "0/3", "4/3", "x/y"])
async def test_a_bad_shard_is_refused_naming_the_form(
    server, registered_block_type, tmp_path, shard
):
    name = await save_block("shards-bad", server)
    with pytest.raises(ConfigurationError, match="shard"):
        await llamacpp_batch_flow(
            str(write_input(tmp_path / "in.jsonl", 3)),
            str(tmp_path / "out.jsonl"),
            server=name,
            shard=shard,
        )
    assert not (tmp_path / "out.jsonl").exists()
