"""Batch input from object storage: a real S3 server on loopback (tests/object_storage.py), a
real llama-server, the same code users run."""

from __future__ import annotations

from collections import Counter

import pytest

from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from tests.flows.test_batch_flow import read_output, save_block, successes, write_input
from tests.object_storage import upload

pytestmark = pytest.mark.integration


async def test_a_batch_reads_its_input_from_s3(server, registered_block_type, s3_bucket, tmp_path):
    name = await save_block("batch-s3", server)
    url = upload(write_input(tmp_path / "in.jsonl", 30), f"s3://{s3_bucket}/jobs/in.jsonl")
    target = tmp_path / "out.jsonl"
    summary = await llamacpp_batch_flow(url, str(target), server=name, request={"max_tokens": 4})
    assert summary.succeeded == 30 and summary.input_path == url
    assert successes(read_output(target)) == Counter({f"q{i}": 1 for i in range(30)})
    again = await llamacpp_batch_flow(url, str(target), server=name, request={"max_tokens": 4})
    assert again.skipped_done == 30 and again.succeeded == 0


async def test_a_missing_object_or_bucket_is_refused_before_anything_runs(s3_bucket, tmp_path):
    for url in (f"s3://{s3_bucket}/nothing.jsonl", "s3://no-such-bucket-here/in.jsonl"):
        state = await llamacpp_batch_flow(url, str(tmp_path / "out.jsonl"), return_state=True)
        assert state.is_failed() and "does not exist" in state.message, state.message
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAEXAMPLE:hunter2secret@bucket/in.jsonl",
        "https://host/in.jsonl?X-Amz-Signature=hunter2secret",
        "s3://bucket/in.jsonl?access_token=hunter2secret",
    ],
)
async def test_credentials_in_an_input_url_are_refused_and_never_shown(url, tmp_path):
    state = await llamacpp_batch_flow(url, str(tmp_path / "out.jsonl"), return_state=True)
    assert state.is_failed() and "carries credentials" in state.message
    assert "hunter2secret" not in state.message


async def test_an_object_storage_output_is_refused_saying_so(s3_bucket, tmp_path):
    source = write_input(tmp_path / "in.jsonl", 2)
    state = await llamacpp_batch_flow(str(source), f"s3://{s3_bucket}/out.jsonl", return_state=True)
    assert state.is_failed() and "not yet written to" in state.message


async def test_missing_storage_credentials_are_named_not_taken_for_a_missing_file(
    s3_bucket, monkeypatch, tmp_path
):
    import s3fs

    url = upload(write_input(tmp_path / "in.jsonl", 2), f"s3://{s3_bucket}/in.jsonl")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    state = await llamacpp_batch_flow(url, str(tmp_path / "out.jsonl"), return_state=True)
    assert state.is_failed() and "cannot read" in state.message and "credentials" in state.message
