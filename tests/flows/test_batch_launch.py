"""A batch that starts its own llama-server (`launch=`): it runs, it stops the server whatever
ends the run (a SIGKILL of the flow's process group included: checked by PID), and a server
wedged mid-batch is restarted while the batch waits, every line answered once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from prefect_llamacpp.batch.options import RunOptions
from prefect_llamacpp.blocks import LlamaCppLaunch
from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from prefect_llamacpp.flows.launched import launch_parameter
from prefect_llamacpp.launch import LaunchSpec
from tests.flows.test_batch_flow import read_output, successes, wait_for_lines, write_input
from tests.flows.test_health_flow import events_named
from tests.object_storage import upload
from tests.servers import none_left, servers_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def own_model(tiny_model, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLAMACPP_MODEL_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copy(tiny_model, tmp_path / "launched-tiny.gguf"))


async def test_a_batch_starts_its_own_server_and_stops_it(
    llama_server_bin, own_model, tmp_path, registered_block_type
):
    source = write_input(tmp_path / "in.jsonl", 120)
    target = tmp_path / "out.jsonl"
    launch = LaunchSpec(binary=str(llama_server_bin), model=str(own_model), alias="tiny-own")
    summary = await llamacpp_batch_flow(
        str(source), str(target), launch=launch, request={"max_tokens": 8}
    )
    assert summary.succeeded == 120 and summary.model == "tiny-own"
    assert summary.concurrency == 4 + RunOptions().queue_depth  # its 4 slots and a queue
    assert successes(read_output(target)) == Counter({f"q{i}": 1 for i in range(120)})
    assert none_left(own_model, 5)
    rerun = await llamacpp_batch_flow(
        str(source), str(target), launch=launch, request={"max_tokens": 8}
    )
    assert rerun.skipped_done == 120 and rerun.succeeded == 0
    assert none_left(own_model, 5)


async def test_a_launch_block_with_a_model_on_the_s3_server(
    llama_server_bin, own_model, tmp_path, registered_block_type, s3_bucket
):
    LlamaCppLaunch.register_type_and_schema()
    url = upload(own_model, f"s3://{s3_bucket}/models/launched-tiny.gguf")
    await LlamaCppLaunch(
        binary=str(llama_server_bin), model=url, model_size=own_model.stat().st_size, parallel=2
    ).save("launch-s3", overwrite=True)
    source = write_input(tmp_path / "in.jsonl", 40)
    summary = await llamacpp_batch_flow(
        str(source), str(tmp_path / "out.jsonl"), launch="launch-s3", request={"max_tokens": 8}
    )
    assert summary.succeeded == 40 and summary.model == "launched-tiny.gguf"
    cached = list((tmp_path / "cache").glob("*launched-tiny.gguf"))
    assert len(cached) == 1 and none_left(cached[0], 5)


async def test_each_shard_run_starts_its_own_server_from_the_parents_parameter(
    llama_server_bin, own_model, tmp_path, registered_block_type, s3_bucket
):
    """What a shard's worker does with the `launch` its parent passes: the spec as JSON, as
    Prefect stores it, starts a server of its own there; the shards answer each line once."""
    spec = LaunchSpec(binary=str(llama_server_bin), model=str(own_model), parallel=2)
    parameter = launch_parameter(spec)
    assert parameter == json.loads(json.dumps(parameter))  # what Prefect stores and hands back
    source = upload(write_input(tmp_path / "in.jsonl", 40), f"s3://{s3_bucket}/launch-in.jsonl")
    answered: Counter = Counter()
    for k in (1, 2):
        output = f"s3://{s3_bucket}/launch-out.jsonl.shards/{k}-of-2.jsonl"
        summary = await llamacpp_batch_flow(
            source, output, launch=parameter, request={"max_tokens": 4}, shard=f"{k}/2"
        )
        assert summary.failed == 0 and none_left(own_model, 5)  # its server stopped with it
        answered.update(successes(json.loads(line) for line in read_lines(output)))
    assert answered == Counter({f"q{i}": 1 for i in range(40)})


def test_a_spec_with_a_key_is_not_passed_as_a_shard_parameter():
    spec = LaunchSpec(model="/m.gguf", api_key="sk-shard-secret")
    with pytest.raises(ConfigurationError, match="Launch block") as caught:
        launch_parameter(spec)
    assert "sk-shard-secret" not in str(caught.value)
    assert launch_parameter("gpu-launch") == "gpu-launch"  # a block's name travels as it is


def read_lines(url: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs.cat_file(url).decode().splitlines()


async def test_a_missing_launch_block_names_the_fix(tmp_path, registered_block_type):
    source = write_input(tmp_path / "in.jsonl", 3)
    state = await llamacpp_batch_flow(
        str(source), str(tmp_path / "out.jsonl"), launch="no-such-launch", return_state=True
    )
    assert state.is_failed()
    assert "No llama.cpp Launch block named 'no-such-launch'" in state.message


def test_sigkill_of_the_flows_process_group_leaves_no_server(
    llama_server_bin, own_model, tmp_path, prefect_harness
):
    source = write_input(tmp_path / "in.jsonl", 3000)
    target = tmp_path / "out.jsonl"
    flow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_llamacpp.flows.batch",
            str(source),
            str(target),
            "--launch-model",
            str(own_model),
            "--max-tokens",
            "32",
            "--no-broker",
        ],
        env={
            **os.environ,
            "LLAMA_SERVER_BIN": str(llama_server_bin),
            "PREFECT_API_URL": PREFECT_API_URL.value(),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not target.exists() or len(target.read_text().splitlines()) < 50:
            assert flow.poll() is None, "the batch ended before it was killed"
            assert time.monotonic() < deadline, "no results within 120 s"
            time.sleep(0.05)
        (pid,) = servers_of(own_model)
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()
        assert none_left(own_model, 15), f"llama-server {pid} outlived its flow run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flow.pid, signal.SIGKILL)


async def test_a_wedged_server_is_restarted_and_the_batch_answers_every_line_once(
    llama_server_bin,
    own_model,
    tmp_path,
    registered_block_type,
    asserting_events_worker,
    reset_worker_events,
):
    source = write_input(tmp_path / "in.jsonl", 600)
    target = tmp_path / "out.jsonl"
    launch = LaunchSpec(
        binary=str(llama_server_bin),
        model=str(own_model),
        restart={"check_interval": 1, "failed_checks": 2, "first_byte_timeout": 2},
    )
    run = asyncio.create_task(
        llamacpp_batch_flow(
            str(source),
            str(target),
            launch=launch,
            request={"max_tokens": 24},
            # Beyond a slow answer on a loaded machine; a stopped server is killed sooner.
            run={"request_timeout": 10, "ready_timeout": 120},
        )
    )
    await wait_for_lines(target, 60, run)
    (first,) = servers_of(own_model)
    os.kill(first, signal.SIGSTOP)  # alive, listening, answering nothing
    summary = await run
    assert successes(read_output(target)) == Counter({f"q{i}": 1 for i in range(600)})
    assert summary.succeeded + summary.skipped_done == 600 and summary.failed == 0
    assert none_left(own_model, 5)
    asserting_events_worker.drain()
    kinds = [event.event for event in events_named(asserting_events_worker)]
    assert "llamacpp.server.wedged" in kinds
    assert kinds.index("llamacpp.server.wedged") < kinds.index("llamacpp.server.restarted")
    restarted = next(
        e for e in events_named(asserting_events_worker) if e.event.endswith("restarted")
    )
    assert restarted.payload["managed"] is True and restarted.payload["pid"] != first
    assert "wedged 2 checks in a row" in restarted.payload["reason"]
