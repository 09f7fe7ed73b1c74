"""The object-storage side of a ledger, against a real S3 server on loopback (moto): parts are
create-only, a publish that landed is not published twice, another run's part stops this one,
the join keeps one success line per id, a restore trusts only what is published."""

from __future__ import annotations

import json

import pytest

from prefect_llamacpp.batch import published as published_module
from prefect_llamacpp.batch.ledger import Ledger
from prefect_llamacpp.batch.published import PublishedLedger
from prefect_llamacpp.exceptions import ConfigurationError, LedgerInUseError


def line(custom_id: str, error: str | None = None) -> bytes:
    record = {"custom_id": custom_id, "output": "x", "error": None}
    if error:
        record["error"] = {"kind": error, "message": error}
    return json.dumps(record).encode() + b"\n"


def append(published: PublishedLedger, data: bytes) -> None:
    published.local.write_bytes(published.local.read_bytes() + data)


@pytest.fixture
def fs(s3_bucket):
    import s3fs

    return s3fs.S3FileSystem()


def staged(url: str, tmp_path, name: str = "node") -> PublishedLedger:
    ledger = PublishedLedger(url, staging=tmp_path / name)
    ledger.restore()
    return ledger


async def test_new_lines_are_published_once_as_numbered_parts(s3_bucket, fs, tmp_path):
    url = f"s3://{s3_bucket}/out.jsonl"
    published = staged(url, tmp_path)
    published.local.write_bytes(line("a") + line("b") + b'{"custom_id": "c", "out')
    assert await published.publish() == 1
    assert await published.publish() == 0  # nothing new: no empty part
    append(published, b'put": "x", "error": null}\n')  # the line being written, now whole
    assert await published.publish() == 1
    parts = sorted(fs.ls(f"{s3_bucket}/out.jsonl.parts", detail=False))
    assert [name.rsplit("/", 1)[1] for name in parts] == ["part-000000.jsonl", "part-000001.jsonl"]
    assert fs.cat_file(parts[0]) == line("a") + line("b")

    again = staged(url, tmp_path, "other-node")
    assert again.local.read_bytes() == published.local.read_bytes() and again.parts == 2


async def test_a_publish_that_landed_before_is_not_an_error(s3_bucket, fs, tmp_path):
    url = f"s3://{s3_bucket}/out.jsonl"
    published = staged(url, tmp_path)
    published.local.write_bytes(line("a"))
    # The first try landed, its answer was lost: the same bytes are there already.
    fs.pipe_file(f"{s3_bucket}/out.jsonl.parts/part-000000.jsonl", line("a"))
    assert await published.publish() == 1 and published.parts == 1


async def test_a_part_another_run_wrote_stops_this_one(s3_bucket, fs, tmp_path):
    url = f"s3://{s3_bucket}/out.jsonl"
    zombie, current = staged(url, tmp_path, "zombie"), staged(url, tmp_path, "current")
    zombie.local.write_bytes(line("a"))
    current.local.write_bytes(line("b"))
    await zombie.publish()
    with pytest.raises(LedgerInUseError, match="written by another run"):
        await current.publish()
    assert fs.cat_file(f"{s3_bucket}/out.jsonl.parts/part-000000.jsonl") == line("a")


async def test_the_join_keeps_the_first_success_line_of_each_id(s3_bucket, fs, tmp_path):
    url = f"s3://{s3_bucket}/out.jsonl"
    parts = f"{s3_bucket}/out.jsonl.parts"
    # Two runs answered b (one had lost its lease): both parts are published.
    fs.pipe_file(f"{parts}/part-000000.jsonl", line("a") + line("b") + line("c", "timeout"))
    fs.pipe_file(f"{parts}/part-000001.jsonl", line("b") + line("c"))
    published = staged(url, tmp_path)
    with Ledger.open(published.local) as ledger:
        assert ledger.state.duplicate_successes == 1
        await published.join(ledger)
    joined = [json.loads(raw) for raw in fs.cat_file(url).splitlines()]
    assert [(r["custom_id"], r["error"] is None) for r in joined] == [
        ("a", True),
        ("b", True),
        ("c", False),
        ("c", True),
    ]


async def test_a_restore_trusts_only_what_is_published(s3_bucket, fs, tmp_path):
    url = f"s3://{s3_bucket}/out.jsonl"
    first = staged(url, tmp_path)
    first.local.write_bytes(line("a"))
    await first.publish()
    append(first, line("b"))  # written, never published: the node died here
    again = staged(url, tmp_path)  # the same node, the same staging directory
    assert again.local.read_bytes() == line("a")


async def test_a_line_longer_than_a_part_is_one_part(s3_bucket, fs, tmp_path, monkeypatch):
    monkeypatch.setattr(published_module, "MAX_PART_BYTES", 64)
    published = staged(f"s3://{s3_bucket}/out.jsonl", tmp_path)
    long = json.dumps({"custom_id": "a", "output": "x" * 200, "error": None}).encode() + b"\n"
    published.local.write_bytes(line("z") * 3 + long + line("b"))
    assert await published.publish() >= 3
    restored = staged(f"s3://{s3_bucket}/out.jsonl", tmp_path, "other")
    assert restored.local.read_bytes() == published.local.read_bytes()


async def test_a_missing_bucket_is_named_with_the_fix(s3_server, fs, tmp_path):
    published = staged("s3://no-such-bucket-here/out.jsonl", tmp_path)
    published.local.write_bytes(line("a"))
    with pytest.raises(ConfigurationError, match="no-such-bucket-here.*credentials and endpoint"):
        await published.publish()


async def test_a_cut_line_in_a_part_is_dropped_and_runs_again(s3_bucket, fs, tmp_path):
    url = f"s3://{s3_bucket}/out.jsonl"
    fs.pipe_file(
        f"{s3_bucket}/out.jsonl.parts/part-000000.jsonl", line("a") + b'{"custom_id": "b", '
    )
    published = staged(url, tmp_path)
    assert published.local.read_bytes() == line("a")
    append(published, line("b"))
    await published.publish()
    assert fs.cat_file(f"{s3_bucket}/out.jsonl.parts/part-000001.jsonl") == line("b")


async def test_a_run_that_lost_the_output_does_not_join_over_newer_parts(s3_bucket, fs, tmp_path):
    url = f"s3://{s3_bucket}/out.jsonl"
    zombie = staged(url, tmp_path, "zombie")
    zombie.local.write_bytes(line("a"))
    await zombie.publish()
    newer = staged(url, tmp_path, "newer")  # the zombie's lease lapsed; another run went on
    append(newer, line("b"))
    with Ledger.open(newer.local) as ledger:
        await newer.join(ledger)
    with Ledger.open(zombie.local) as ledger, pytest.raises(LedgerInUseError, match="after this"):
        await zombie.join(ledger)
    assert successes_in(fs.cat_file(url)) == {"a", "b"}


def successes_in(data: bytes) -> set[str]:
    return {json.loads(raw)["custom_id"] for raw in data.splitlines()}
