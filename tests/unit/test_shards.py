"""Shards split the input by custom_id, and the broker's grants bound the dispatcher."""

from __future__ import annotations

import asyncio
import random

import pytest

from prefect_llamacpp.batch.dispatch import Dispatcher, Lane
from prefect_llamacpp.batch.jsonl_input import InputReader, Shard
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.flows.capacity import limit_names, shares
from prefect_llamacpp.flows.shards import batch_tag


@pytest.mark.parametrize(
    ("text", "words"), [("3", "K/N"), ("0/3", "from 1"), ("4/3", "from 1"), ("a/b", "K/N")]
)
def test_a_bad_shard_is_named(text, words):
    with pytest.raises(ValueError, match=words):
        Shard.parse(text)


def test_every_line_lands_in_exactly_one_shard_whatever_its_bytes(tmp_path):
    rng = random.Random(3)
    lines = [f'{{"custom_id": "q{i}", "prompt": "hi {i}"}}'.encode() for i in range(900)]
    lines += [b'{"prompt": "no id"}', b"not json", b'{"custom_id": 7, "prompt": "int id"}']
    lines += [b'{"custom_id": "q5", "prompt": "a repeated id"}', b"\xff\xfe bad bytes", b""]
    lines += [b'{"custom_id": "\\ud800", "prompt": "lone surrogate"}']
    rng.shuffle(lines)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    whole = [(entry.line, entry.custom_id) for entry in InputReader(path)]
    parts = [
        [(entry.line, entry.custom_id) for entry in InputReader(path, shard=Shard(k, 3))]
        for k in (1, 2, 3)
    ]
    assert sorted(sum(parts, [])) == sorted(whole)  # none lost, none twice
    assert all(250 < len(part) < 370 for part in parts), [len(part) for part in parts]
    # A repeated id lands with its first line, so its shard still refuses it as a repeat.
    (holder,) = [Shard(k, 3) for k in (1, 2, 3) if Shard(k, 3).owns("q5")]
    repeats = [entry for entry in InputReader(path, shard=holder) if entry.custom_id == "q5"]
    assert len(repeats) == 2 and repeats[1].kind == "duplicate_id"


def test_the_split_is_stable_across_processes():
    # blake2b, not hash(): another worker (another PYTHONHASHSEED) must agree.
    assert [Shard(k, 4).owns("custom-42") for k in (1, 2, 3, 4)].count(True) == 1
    assert Shard(1, 4).owns("custom-42")  # the same in every process and version


def test_a_batch_is_its_input_output_and_shard_count():
    tag = batch_tag("s3://b/in.jsonl", "s3://b/out.jsonl", 3)
    assert tag == batch_tag("s3a://b/in.jsonl", "s3://b/out.jsonl/", 3)  # one name per object
    assert tag != batch_tag("s3://b/in.jsonl", "s3://b/out.jsonl", 4)
    assert tag != batch_tag("s3://b/in.jsonl", "s3://b/other.jsonl", 3)


@pytest.mark.parametrize(
    ("slots", "priority", "priorities", "expected"),
    [
        (5, 1, 1, (5, 5)),  # alone: every slot
        (5, 1, 2, (2, 3)),
        (5, 1, 4, (1, 2)),
        (5, 1, 50, (1, 1)),  # more runs than slots: one each, the later ones wait
        (10, 3, 4, (7, 8)),
        (10, 1, 4, (2, 3)),
        (5, 10, 13, (2, 4)),  # beside three runs of priority 1, each of which keeps a slot
    ],
)
def test_a_runs_share_follows_its_priority(slots, priority, priorities, expected):
    assert shares(slots, priority, priorities) == expected


def test_limit_names_are_per_server_and_valid_prefect_names():
    slots, runs, wants = limit_names("http://gpu-1:8080/proxy/llama")
    assert slots.startswith("llamacpp-slots-gpu-1-8080-") and runs.startswith("llamacpp-runs-")
    assert wants.startswith("llamacpp-wants-gpu-1-8080-")
    assert slots != limit_names("http://gpu-1:8080")[0]
    assert all(ch.isalnum() or ch in "._-" for ch in slots + runs + wants)


async def test_a_grant_bounds_the_requests_in_flight_and_more_room_is_handed_out_at_once():
    lane = Lane("a", LlamaCppSettings(base_url="http://127.0.0.1:9/v1"), "m", 5)
    dispatcher = Dispatcher([lane], ready_timeout=60)
    dispatcher.regrant(lane, 2)
    taken = [await dispatcher.take(None) for _ in range(2)]
    waiting = asyncio.create_task(dispatcher.take(None))
    await asyncio.sleep(0.01)
    assert not waiting.done() and lane.in_flight == 2
    dispatcher.regrant(lane, 3)  # the broker grew the grant
    assert await asyncio.wait_for(waiting, 1) is lane and lane.in_flight == 3
    dispatcher.regrant(lane, 1)  # shrunk: those in flight finish, nothing new starts
    for taken_lane in [*taken, lane]:
        dispatcher.give(taken_lane)
    assert lane.in_flight == 0
    assert await dispatcher.take(None) is lane
    blocked = asyncio.create_task(dispatcher.take(None))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    blocked.cancel()
    dispatcher.close()
    await lane.aclose()
