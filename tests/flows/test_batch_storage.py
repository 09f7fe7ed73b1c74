"""Batch input and output on object storage: a real S3 server on loopback (tests/object_storage.py), a
real llama-server, the same code users run."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from tests.flows.conftest import flow_run_record
from tests.flows.test_batch_flow import read_output, save_block, successes, write_input
from tests.object_storage import S3_ENV, upload

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


@pytest.fixture
def node(monkeypatch, tmp_path):
    """Make this process another node: its own empty local disk for staged ledgers."""

    def switch(name: str) -> Path:
        disk = tmp_path / name
        disk.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(disk))
        return disk

    switch("node-a")
    return switch


def read_object(url: str) -> list[dict]:
    import s3fs

    return [json.loads(line) for line in s3fs.S3FileSystem().cat_file(url).splitlines()]


def parts_of(url: str) -> list[str]:
    import s3fs

    return sorted(s3fs.S3FileSystem().ls(url + ".parts", detail=False))


async def test_a_batch_writes_its_results_to_s3_and_another_node_resumes_them(
    server, registered_block_type, s3_bucket, node, tmp_path
):
    name = await save_block("batch-s3-out", server)
    source = write_input(tmp_path / "in.jsonl", 30)
    url = f"s3://{s3_bucket}/runs/out.jsonl"
    summary = await llamacpp_batch_flow(
        str(source), url, server=name, request={"max_tokens": 4}, run={"chunk_size": 10}
    )
    assert summary.succeeded == 30 and summary.output_path == url
    assert successes(read_object(url)) == Counter({f"q{i}": 1 for i in range(30)})
    assert len(parts_of(url)) >= 2  # published at chunk ends, joined at the end
    import s3fs

    settings = json.loads(s3fs.S3FileSystem().cat_file(url + ".settings.json"))
    assert settings["settings"]["max_tokens"] == 4  # what a resume checks against

    node("node-b")  # nothing of the first run on this disk
    longer = write_input(tmp_path / "longer.jsonl", 40)
    again = await llamacpp_batch_flow(
        str(longer), url, server=name, request={"max_tokens": 4}, run={"chunk_size": 10}
    )
    assert again.skipped_done == 30 and again.succeeded == 10
    assert successes(read_object(url)) == Counter({f"q{i}": 1 for i in range(40)})

    changed = await llamacpp_batch_flow(
        str(longer), url, server=name, request={"max_tokens": 5}, return_state=True
    )
    assert changed.is_failed() and "other settings" in changed.message


async def test_an_openai_format_output_on_s3_has_its_errors_object(
    server, registered_block_type, s3_bucket, node, tmp_path
):
    name = await save_block("batch-s3-openai", server)
    source = write_input(tmp_path / "in.jsonl", 5, extra=["{not json"])
    url = f"s3://{s3_bucket}/out.jsonl"
    summary = await llamacpp_batch_flow(
        str(source), url, server=name, request={"max_tokens": 4}, output_format="openai"
    )
    assert summary.succeeded == 5 and summary.failed == 1
    assert summary.errors_path == url + ".errors.jsonl"
    lines = read_object(url)
    assert len(lines) == 6 and all("response" in line for line in lines)
    assert [line["custom_id"] for line in read_object(url + ".errors.jsonl")] == [
        line["custom_id"] for line in lines if line["error"] is not None
    ]


async def test_without_parts_the_output_object_is_the_ledger(
    server, registered_block_type, s3_bucket, node, tmp_path
):
    import s3fs

    name = await save_block("batch-s3-noparts", server)
    source = write_input(tmp_path / "in.jsonl", 8)
    url = f"s3://{s3_bucket}/out.jsonl"
    await llamacpp_batch_flow(str(source), url, server=name, request={"max_tokens": 4})
    s3fs.S3FileSystem().rm(url + ".parts", recursive=True)  # a user tidying up
    node("node-b")
    again = await llamacpp_batch_flow(str(source), url, server=name, request={"max_tokens": 4})
    assert again.skipped_done == 8 and again.succeeded == 0
    assert successes(read_object(url)) == Counter({f"q{i}": 1 for i in range(8)})
    assert parts_of(url)  # published again: the parts are the ledger from now on


async def test_an_output_in_a_missing_bucket_is_refused_before_anything_is_sent(
    server, registered_block_type, s3_bucket, node, tmp_path
):
    name = await save_block("batch-s3-nobucket", server)
    source = write_input(tmp_path / "in.jsonl", 3)
    before = await completions_served(server)
    state = await llamacpp_batch_flow(
        str(source), "s3://no-such-bucket-here/out.jsonl", server=name, return_state=True
    )
    assert state.is_failed() and "cannot write s3://no-such-bucket-here/out.jsonl" in state.message
    assert await completions_served(server) == before


async def completions_served(server) -> float:
    async with LlamaCppClient(server.url, api_key=None) as client:
        metrics = await client.get_metrics()
    return metrics["prompt_tokens_total"]


@pytest.mark.parametrize(
    "output",
    [
        "s3://AKIAEXAMPLE:hunter2secret@bucket/out.jsonl",
        "s3://bucket/out.jsonl?X-Amz-Signature=hunter2secret",
    ],
)
async def test_credentials_in_an_output_url_are_refused_and_never_shown(output, tmp_path):
    source = write_input(tmp_path / "in.jsonl", 2)
    state = await llamacpp_batch_flow(str(source), output, return_state=True)
    assert state.is_failed() and "output URL" in state.message and "credentials" in state.message
    assert "hunter2secret" not in state.message


@pytest.mark.parametrize("suffix", ["", ".errors.jsonl", ".parts/part-000000.jsonl"])
@pytest.mark.parametrize("alias", ["s3://{}/out.jsonl", "s3://{}/out.jsonl/", "s3a://{}/out.jsonl"])
async def test_an_input_the_batch_would_write_is_refused(s3_bucket, suffix, alias, tmp_path):
    url = alias.format(s3_bucket)
    input_url = upload(write_input(tmp_path / "in.jsonl", 2), f"s3://{s3_bucket}/out.jsonl{suffix}")
    state = await llamacpp_batch_flow(input_url, url, return_state=True)
    assert state.is_failed() and "another URL" in state.message, state.message


@pytest.mark.parametrize("output", ["s3://{}", "s3://{}/"])
async def test_a_bucket_is_no_output(s3_bucket, output, tmp_path):
    source = write_input(tmp_path / "in.jsonl", 2)
    state = await llamacpp_batch_flow(str(source), output.format(s3_bucket), return_state=True)
    assert state.is_failed() and "names a bucket" in state.message, state.message


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


@pytest.fixture
def storage_only_in_blocks(s3_bucket, monkeypatch, tmp_path):
    """No credentials or endpoint in this process's environment: only a block holds them."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    return s3_bucket


BLOCK_SECRET = "hunter2-storage-secret"  # moto takes any secret


async def save_storage_blocks(bucket: str, endpoint: str) -> None:
    from prefect.filesystems import RemoteFileSystem
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    await RemoteFileSystem(
        basepath=f"s3://{bucket}/team",
        settings={
            "key": "testing",
            "secret": BLOCK_SECRET,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        },
    ).save("results", overwrite=True)
    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key=BLOCK_SECRET,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint),
    )
    await S3Bucket(bucket_name=bucket, bucket_folder="team", credentials=credentials).save(
        "results", overwrite=True
    )


@pytest.mark.parametrize("storage", ["remote-file-system/results", "s3-bucket/results"])
async def test_a_storage_block_holds_the_credentials_and_the_base(
    storage, server, registered_block_type, storage_only_in_blocks, s3_server, node, tmp_path
):
    bucket = storage_only_in_blocks
    await save_storage_blocks(bucket, s3_server)
    with pytest.MonkeyPatch.context() as env:  # the input uploaded with credentials of our own
        for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
            env.setenv(name, value)
        upload(write_input(tmp_path / "in.jsonl", 6), f"s3://{bucket}/team/jobs/in.jsonl")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = await save_block("batch-s3-block", server)
    state = await llamacpp_batch_flow(
        "jobs/in.jsonl",
        "results/out.jsonl",
        server=name,
        request={"max_tokens": 4},
        storage=storage,
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = await state.aresult()
    assert summary.output_path == f"s3://{bucket}/team/results/out.jsonl"
    assert summary.succeeded == 6
    record = await flow_run_record(state.state_details.flow_run_id)
    assert BLOCK_SECRET not in record["text"]
    for path in tmp_path.rglob("*"):  # the staged ledger, its settings: no secret on disk
        if path.is_file():
            assert BLOCK_SECRET.encode() not in path.read_bytes(), path
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
            env.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        assert successes(read_object(summary.output_path)) == Counter(
            {f"q{i}": 1 for i in range(6)}
        )


async def test_without_the_block_the_same_run_is_refused_naming_the_fix(
    storage_only_in_blocks, tmp_path
):
    bucket = storage_only_in_blocks
    state = await llamacpp_batch_flow(
        str(write_input(tmp_path / "in.jsonl", 1)), f"s3://{bucket}/out.jsonl", return_state=True
    )
    assert state.is_failed() and "credentials" in state.message, state.message


@pytest.mark.parametrize(
    ("storage", "says"),
    [
        ("results", "give the block as"),
        ("remote-file-system/nothing-saved", "No storage block"),
        ("llamacpp-server/some-server", "not storage a batch can use"),
    ],
)
async def test_a_storage_name_that_is_no_storage_block_is_refused(
    storage, says, registered_block_type, server, tmp_path
):
    if storage.startswith("llamacpp-server"):
        await save_block("some-server", server)
    source = write_input(tmp_path / "in.jsonl", 1)
    state = await llamacpp_batch_flow(
        str(source), str(tmp_path / "out.jsonl"), storage=storage, return_state=True
    )
    assert state.is_failed() and says in state.message, state.message


async def test_a_large_input_object_is_sampled_not_downloaded_before_the_first_request(
    server, registered_block_type, s3_bucket, node, monkeypatch, tmp_path
):
    import s3fs.core

    from prefect_llamacpp import storage
    from prefect_llamacpp.flows import batch as batch_module

    monkeypatch.setattr(storage, "_BLOCK_BYTES", 4096)  # reads in small blocks, to count them
    monkeypatch.setattr(batch_module, "URL_SAMPLE_BYTES", 16_384)
    source = write_input(tmp_path / "in.jsonl", 1500)  # about 75 KB
    url = upload(source, f"s3://{s3_bucket}/big.jsonl")
    fetched = []
    real_fetch = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        fetched.append(end - start)
        return real_fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    lines, embedding_lines = batch_module._count_lines(url)
    assert sum(fetched) <= 16_384 + 2 * 4096 < source.stat().st_size / 2
    assert abs(lines - 1500) < 150 and embedding_lines == 0  # an estimate from the sample

    name = await save_block("batch-s3-big", server)
    summary = await llamacpp_batch_flow(
        url, str(tmp_path / "out.jsonl"), server=name, request={"max_tokens": 1}
    )
    assert summary.succeeded == 1500


async def test_storage_that_fails_mid_run_stops_it_and_a_rerun_finishes(
    server, registered_block_type, s3_bucket, node, monkeypatch, tmp_path
):
    from prefect_llamacpp.batch.published import PublishedLedger
    from prefect_llamacpp.exceptions import ConfigurationError

    name = await save_block("batch-s3-fails", server)
    source = write_input(tmp_path / "in.jsonl", 40)
    url = f"s3://{s3_bucket}/out.jsonl"
    real_put = PublishedLedger._put_part

    async def failing_after_one(self, number, data):
        if number >= 1:
            raise ConfigurationError(f"cannot write {url} (EndpointConnectionError): ...")
        await real_put(self, number, data)

    monkeypatch.setattr(PublishedLedger, "_put_part", failing_after_one)
    state = await llamacpp_batch_flow(
        str(source),
        url,
        server=name,
        request={"max_tokens": 4},
        run={"chunk_size": 5},
        return_state=True,
    )
    assert state.is_failed() and "cannot write" in state.message, state.message
    published = successes(read_object(parts_of(url)[0].join(["s3://", ""])))
    monkeypatch.setattr(PublishedLedger, "_put_part", real_put)
    node("node-b")
    again = await llamacpp_batch_flow(str(source), url, server=name, request={"max_tokens": 4})
    assert again.skipped_done == sum(published.values())
    assert successes(read_object(url)) == Counter({f"q{i}": 1 for i in range(40)})
