"""The batch flow's promises, tried as a careless or hostile user would, against real servers:
nothing lost, nothing answered twice, nothing leaked, every line accounted for."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from harness.server import LlamaServer
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from tests.conftest import SECRET_KEY
from tests.crash_relay import CrashingRelay
from tests.flows.conftest import flow_run_record
from tests.flows.test_batch_flow import (
    read_output,
    save_block,
    successes,
    write_input,
)
from tests.hostile_input import ERROR_KINDS_COVERED, GOOD, write_hostile_input
from tests.stalling_proxy import StallingProxy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


async def test_the_same_file_in_and_out_is_refused_and_left_alone(tmp_path):
    source = write_input(tmp_path / "in.jsonl", 5)
    before = source.read_bytes()
    os.link(source, tmp_path / "alias.jsonl")
    for output in (source, tmp_path / "." / "in.jsonl", tmp_path / "alias.jsonl"):
        state = await llamacpp_batch_flow(str(source), str(output), return_state=True)
        assert state.is_failed() and "same file" in state.message
    assert source.read_bytes() == before


async def test_a_second_run_on_the_same_output_fails_at_once(
    server, registered_block_type, tmp_path
):
    count = 60
    source = write_input(tmp_path / "in.jsonl", count)
    target = tmp_path / "out.jsonl"
    # A proxy answers the first 20 completions and holds the rest until released, so the first
    # run is certainly still going (and holding the output) when the second starts; timing alone
    # once let 600 lines end before the second run began.
    with StallingProxy(server.url, mode="hold", hold_after=20) as proxy:
        await LlamaCppServer(base_url=f"{proxy.url}/v1", timeout=30).save(
            "batch-held", overwrite=True
        )
        first = asyncio.create_task(
            llamacpp_batch_flow(
                str(source),
                str(target),
                server="batch-held",
                request={"max_tokens": 8},
                run={"chunk_size": 10},
            )
        )
        deadline = time.monotonic() + 60
        while not proxy.held:
            assert not first.done(), "the first run ended before any completion was held"
            assert time.monotonic() < deadline, "no completion reached the hold"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        second = await llamacpp_batch_flow(
            str(source),
            str(target),
            server="batch-held",
            return_state=True,
            request={"max_tokens": 8},
        )
        refused_in = time.monotonic() - started
        assert not first.done()
        proxy.release()
        summary = await first
    assert second.is_failed()
    assert "in use by another batch run" in second.message
    assert refused_in < 60  # a hang guard: the first run is held, so a wait would never end
    assert summary.succeeded == count
    assert successes(read_output(target)) == Counter({f"q{i}": 1 for i in range(count)})


@pytest.mark.parametrize(
    "base_url",
    [
        f"http://admin:{SECRET_KEY}@127.0.0.1:1/v1",
        f"http://127.0.0.1:1/v1?api_key={SECRET_KEY}",
        f"http://127.0.0.1:1/v1#{SECRET_KEY}",
        f"http://{SECRET_KEY}@127.0.0.1:1/v1",
    ],
)
async def test_a_key_inside_the_url_is_never_shown(monkeypatch, tmp_path, base_url):
    monkeypatch.setenv("LLAMACPP_BASE_URL", base_url)
    source = write_input(tmp_path / "in.jsonl", 2)
    state = await llamacpp_batch_flow(
        str(source), str(tmp_path / "out.jsonl"), server=None, return_state=True
    )
    assert state.is_failed()
    assert "LLAMACPP_API_KEY" in state.message or "api_key" in state.message
    record = await flow_run_record(state.state_details.flow_run_id)
    assert SECRET_KEY not in record["text"]
    assert SECRET_KEY not in state.message


async def test_hostile_input_every_line_accounted_for_good_lines_answered(
    server, registered_block_type, tmp_path
):
    name = await save_block("batch-main", server)
    source = tmp_path / "hostile.jsonl"
    expected = write_hostile_input(source)
    assert len(ERROR_KINDS_COVERED) >= 7 and len(expected) - 1 >= 20
    target = tmp_path / "out.jsonl"
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 8}
    )
    records = read_output(target)
    by_line = {record["line"]: record for record in records}
    assert len(records) == len(by_line) == len(expected), "one line out per line in"
    for number, (custom_id, outcome) in expected.items():
        record = by_line[number]
        assert record["custom_id"] == custom_id, number
        if outcome == GOOD:
            assert record["error"] is None, (number, record["error"])
            assert record["output"] is not None
        else:
            assert record["error"]["kind"] == outcome, (number, record["error"])
            assert f"line {number}" in record["error"]["message"]
    good = sum(outcome == GOOD for _, outcome in expected.values())
    assert summary.succeeded == good and summary.failed == len(expected) - good

    rerun = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 8}
    )
    assert rerun.skipped_done == good and rerun.succeeded == 0
    assert read_output(target) == records, "a rerun writes nothing new"


def poisoned_input(path: Path, count: int, at: int) -> Path:
    """`count` ordinary prompts q0... and, at line `at`, the one that crashes the relay's server."""
    source = write_input(path, count, prompt="Question {i}")
    lines = source.read_text().splitlines()
    lines.insert(at, json.dumps({"custom_id": "poison", "prompt": "POISON-PILL now"}))
    source.write_text("\n".join(lines) + "\n")
    return source


@pytest.fixture
def restartable_server(llama_server_bin, tiny_model, tmp_path):
    server = LlamaServer(
        tiny_model,
        ["-np", "4", "--alias", "tiny", "--cache-ram", "0"],
        binary=llama_server_bin,
        log_dir=tmp_path,
    )
    with server:
        yield server


async def test_a_prompt_that_crashes_the_server_is_given_up_alone(
    restartable_server, registered_block_type, tmp_path
):
    async with CrashingRelay(restartable_server, poison=b"POISON-PILL") as relay:
        from prefect_llamacpp.blocks import LlamaCppServer

        await LlamaCppServer(base_url=relay.url, timeout=5).save("batch-relay", overwrite=True)
        source = poisoned_input(tmp_path / "in.jsonl", 40, at=20)
        target = tmp_path / "out.jsonl"
        summary = await llamacpp_batch_flow(
            str(source),
            str(target),
            server="batch-relay",
            request={"max_tokens": 64, "extra_body": {"ignore_eos": True}},
            run={"ready_timeout": 60},
        )
    records = read_output(target)
    assert relay.crashes == 2, "in flight at one crash, alone at the second, then given up"
    poison = [r for r in records if r["custom_id"] == "poison"]
    assert len(poison) == 1 and poison[0]["error"]["kind"] == "server_crash"
    assert successes(records) == Counter({f"q{i}": 1 for i in range(40)}), "innocents finish"
    assert summary.crashes_seen > 2, "other requests were in flight at the first crash"
    assert all(r["attempts"] <= 2 * (3 + 2) for r in records)


async def test_behind_a_proxy_a_restarting_server_blames_only_the_poison(
    restartable_server, registered_block_type, tmp_path
):
    # The deployment most teams have: a proxy in front of llama-server, and a supervisor that
    # restarts the server 1.5 s after it dies. Meanwhile the proxy accepts each connection and
    # closes it unanswered. Only the prompt that crashes the server alone is given up.
    async with CrashingRelay(
        restartable_server, poison=b"POISON-PILL", while_down="drop", restart_delay=1.5
    ) as relay:
        from prefect_llamacpp.blocks import LlamaCppServer

        await LlamaCppServer(base_url=relay.url, timeout=5).save("batch-proxy", overwrite=True)
        source = poisoned_input(tmp_path / "in.jsonl", 48, at=16)
        target = tmp_path / "out.jsonl"
        summary = await llamacpp_batch_flow(
            str(source),
            str(target),
            server="batch-proxy",
            request={"max_tokens": 8, "extra_body": {"ignore_eos": True}},
            run={"ready_timeout": 30, "max_crashes": 2},
        )
    records = read_output(target)
    poison = [r for r in records if r["custom_id"] == "poison"]
    assert len(poison) == 1 and poison[0]["error"]["kind"] == "server_crash", poison
    assert successes(records) == Counter({f"q{i}": 1 for i in range(48)}), [
        (r["custom_id"], r["error"]) for r in records if r["error"]
    ]
    assert summary.failed == 1 and summary.succeeded == 48
    assert 2 <= relay.crashes <= 2 * 2


async def test_a_mistyped_block_fails_before_sending_and_env_is_only_the_fallback(
    server, registered_block_type, tmp_path, monkeypatch
):
    source = write_input(tmp_path / "in.jsonl", 3)
    target = tmp_path / "out.jsonl"
    state = await llamacpp_batch_flow(
        str(source), str(target), server="batch-mian", return_state=True
    )
    assert state.is_failed() and "No llama.cpp Server block named 'batch-mian'" in state.message
    assert "LlamaCppServer(base_url=...).save('batch-mian')" in state.message
    assert not target.exists()

    # An invalid URL in the environment does not break a run that names a valid block...
    monkeypatch.setenv("LLAMACPP_BASE_URL", "http://host:abc/v1")
    name = await save_block("batch-main", server)
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 4}
    )
    assert summary.succeeded == 3
    # ...and with no server named and no default block, the environment is used, and said so.
    monkeypatch.setenv("LLAMACPP_BASE_URL", server.openai_base)
    state = await llamacpp_batch_flow(
        str(source), str(tmp_path / "env.jsonl"), return_state=True, request={"max_tokens": 4}
    )
    assert state.is_completed(), state.message
    record = await flow_run_record(state.state_details.flow_run_id)
    assert "using the LLAMACPP_* environment settings" in record["logs"]
    assert (await state.aresult()).server == "env"


async def test_a_changed_line_or_changed_settings_are_never_silently_skipped(
    server, registered_block_type, tmp_path
):
    name = await save_block("batch-main", server)
    source = write_input(tmp_path / "in.jsonl", 6)
    target = tmp_path / "out.jsonl"
    await llamacpp_batch_flow(str(source), str(target), server=name, request={"max_tokens": 4})

    lines = source.read_text().splitlines()
    lines[2] = json.dumps({"custom_id": "q2", "prompt": "a different question"})
    source.write_text("\n".join(lines) + "\n")
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 4}
    )
    assert summary.skipped_done == 5 and summary.failed_by_kind == {"ledger_mismatch": 1}
    mismatch = [r for r in read_output(target) if r["error"]]
    assert len(mismatch) == 1 and mismatch[0]["custom_id"] == "q2"
    assert "different request" in mismatch[0]["error"]["message"]
    assert "new output file" in mismatch[0]["error"]["message"]

    state = await llamacpp_batch_flow(
        str(source), str(target), server=name, return_state=True, request={"max_tokens": 9}
    )
    assert state.is_failed() and "max_tokens 4 -> 9" in state.message
    assert "allow_settings_change" in state.message
    more = write_input(tmp_path / "more.jsonl", 8)
    summary = await llamacpp_batch_flow(
        str(more),
        str(target),
        server=name,
        request={"max_tokens": 9},
        run={"allow_settings_change": True},
    )
    # more.jsonl asks q2 as first answered: every answer stays done, q6 and q7 run
    assert summary.skipped_done == 6 and summary.succeeded == 2
    assert summary.settings_changed == ["max_tokens"]


async def test_sigkill_of_the_flow_process_loses_and_repeats_nothing(
    server, registered_block_type, tmp_path
):
    name = await save_block("batch-main", server)
    source = write_input(tmp_path / "in.jsonl", 600)
    target = tmp_path / "out.jsonl"
    command = [
        sys.executable, "-m", "flows.batch", str(source), str(target),
        "--server", name, "--max-tokens", "32", "--chunk-size", "50",
        # The test API reclaims no lapsed lease: slots held by a killed run would stay taken.
        "--no-broker",
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, env=env, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not target.exists() or len(target.read_bytes().splitlines()) < 100:
            assert process.returncode is None, "the batch ended before it could be killed"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # no cleanup, no final flush, mid-write maybe
        await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
    done_before = successes(read_output_tolerant(target))
    assert 100 <= sum(done_before.values()) < 600 and set(done_before.values()) == {1}

    summary = await llamacpp_batch_flow(
        str(source), str(target), server=name, request={"max_tokens": 32}
    )
    assert summary.skipped_done == sum(done_before.values()), "finished work was redone"
    assert summary.succeeded == 600 - summary.skipped_done
    assert successes(read_output(target)) == Counter({f"q{i}": 1 for i in range(600)})


def read_output_tolerant(path: Path) -> list[dict]:
    """The ledger as a crash left it: a cut last line is not a result."""
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


async def test_the_key_is_in_no_file_the_batch_writes(key_server, registered_block_type, tmp_path):
    name = await save_block("batch-secure", key_server, api_key=SECRET_KEY)
    source = write_input(tmp_path / "in.jsonl", 4)
    target = tmp_path / "out.jsonl"
    state = await llamacpp_batch_flow(
        str(source), str(target), server=name, return_state=True, request={"max_tokens": 4}
    )
    assert state.is_completed(), state.message
    record = await flow_run_record(state.state_details.flow_run_id)
    for path in tmp_path.iterdir():
        if path.is_file():
            assert SECRET_KEY.encode() not in path.read_bytes(), path
    assert SECRET_KEY not in record["text"]
    assert SECRET_KEY not in json.dumps(record["run"].parameters)
