"""One batch over several real llama-servers: work follows free slots, a lost server's work
goes to the others, nothing is lost or answered twice; the health flow over a fleet."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from harness.models import ensure_model
from harness.server import LlamaServer
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from tests.conftest import SECRET_KEY
from tests.flows.conftest import flow_run_record
from tests.flows.test_batch_flow import read_output, successes, wait_for_lines, write_input

pytestmark = pytest.mark.integration

LONG = {"ignore_eos": True}  # every answer exactly max_tokens long: the servers set the pace


def three_servers(binary, model, tmp_path, extra=()):
    # One thread each: three servers with llama.cpp's default (one thread per core) on 2 cores
    # fight over them, and once one is killed the two left sometimes crawl at ~80 ms a token
    # instead of 9 (2 of 4 runs, at chunks of 100 or 500; none of 8 with -t 1).
    return [
        LlamaServer(
            model,
            ["-np", str(slots), "-c", str(512 * slots), "-t", "1", "--alias", f"tiny-{slots}"]
            + list(extra),
            binary=binary,
            log_dir=tmp_path,
        )
        for slots in (1, 2, 4)
    ]


@pytest.fixture
def fleet(llama_server_bin, tiny_model, tmp_path):
    """Three servers this test may kill and restart: 1, 2 and 4 slots."""
    servers = three_servers(llama_server_bin, tiny_model, tmp_path)
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def slow_fleet(llama_server_bin, tmp_path):
    """1, 2 and 4 slots of the 340 MB model, one thread each: a step costs about the same for 1
    or 4 sequences (the weights are read once per step), so throughput grows with the slots, as
    on separate machines; with the tiny model three servers on 2 cores would all be CPU-bound
    at one speed whatever their slots."""
    servers = three_servers(llama_server_bin, ensure_model("bench"), tmp_path, ["-t", "1"])
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


async def save_fleet(prefix: str, servers, keys=None) -> list[str]:
    names = []
    for index, server in enumerate(servers):
        name = f"{prefix}-{index}"
        key = (keys or {}).get(index)
        await LlamaCppServer(base_url=server.openai_base, api_key=key, timeout=5).save(
            name, overwrite=True
        )
        names.append(name)
    return names


async def test_work_follows_the_slots_and_every_id_is_answered_once(
    slow_fleet, registered_block_type, tmp_path
):
    names = await save_fleet("fleet", slow_fleet)
    count = 140
    source = write_input(tmp_path / "in.jsonl", count)
    target = tmp_path / "out.jsonl"
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=names, request={"max_tokens": 8, "extra_body": LONG}
    )
    records = read_output(target)
    assert successes(records) == Counter({f"q{i}": 1 for i in range(count)})
    done_by = Counter(record["server"] for record in records)
    # Three servers on one 2-core machine share its CPU, so their speeds are not in proportion
    # to their slots as on machines of their own (that share is checked on scripted servers in
    # tests/unit/test_runner.py; the larger once did no more here under load): here every
    # server works, each up to its own slots.
    assert set(done_by) == set(names)
    shares = {share.server: share for share in summary.servers}
    assert {name: shares[name].succeeded for name in names} == dict(done_by)
    assert [shares[name].capacity for name in names] == [1 + 1, 2 + 1, 4 + 1]
    assert summary.concurrency == (1 + 1) + (2 + 1) + (4 + 1)


async def test_a_server_killed_mid_batch_its_work_goes_to_the_others(
    fleet, registered_block_type, tmp_path
):
    names = await save_fleet("fleet-kill", fleet)
    source = write_input(tmp_path / "in.jsonl", 300)
    target = tmp_path / "out.jsonl"
    run = asyncio.create_task(
        llamacpp_batch_flow(
            str(source), str(target), server=names, request={"max_tokens": 32, "extra_body": LONG}
        )
    )
    await wait_for_lines(target, 60, run)
    fleet[2].kill()  # the largest, not restarted
    summary = await run
    records = read_output(target)
    assert successes(records) == Counter({f"q{i}": 1 for i in range(300)})
    assert all(record["error"] is None for record in records)
    shares = {share.server: share for share in summary.servers}
    assert shares[names[2]].taken_out == 1 and shares[names[2]].rejoined == 0


async def test_a_killed_server_that_comes_back_rejoins_and_takes_work(
    fleet, registered_block_type, tmp_path
):
    names = await save_fleet("fleet-back", fleet)
    source = write_input(tmp_path / "in.jsonl", 500)
    target = tmp_path / "out.jsonl"
    run = asyncio.create_task(
        llamacpp_batch_flow(
            str(source), str(target), server=names, request={"max_tokens": 32, "extra_body": LONG}
        )
    )
    await wait_for_lines(target, 40, run)
    fleet[2].kill()
    await wait_for_lines(target, 120, run)
    lines_before_restart = len(target.read_text().splitlines())
    await asyncio.to_thread(fleet[2].start)
    summary = await run
    records = read_output(target)
    assert successes(records) == Counter({f"q{i}": 1 for i in range(500)})
    after = records[lines_before_restart:]
    assert any(record["server"] == names[2] for record in after), "it took work again"
    shares = {share.server: share for share in summary.servers}
    assert shares[names[2]].taken_out == 1 and shares[names[2]].rejoined == 1


async def test_a_server_down_at_the_start_joins_the_run_when_it_comes_up(
    fleet, registered_block_type, tmp_path
):
    names = await save_fleet("fleet-late", fleet)
    count = 3000  # the two servers left take well over 5 s for it
    fleet[2].kill()  # the largest is down when the run starts...
    source = write_input(tmp_path / "in.jsonl", count)
    target = tmp_path / "out.jsonl"
    run = asyncio.create_task(
        llamacpp_batch_flow(
            str(source), str(target), server=names, request={"max_tokens": 48, "extra_body": LONG}
        )
    )
    await wait_for_lines(target, 20, run)
    await asyncio.sleep(5)
    assert not run.done(), "the batch ended before the late server was started"
    await asyncio.to_thread(fleet[2].start)  # ...and comes up 5 s into it
    summary = await run
    records = read_output(target)
    assert successes(records) == Counter({f"q{i}": 1 for i in range(count)})
    shares = {share.server: share for share in summary.servers}
    assert shares[names[2]].succeeded > 0, shares
    assert shares[names[2]].joined_late and shares[names[2]].taken_out == 0
    assert "unreachable" in summary.skipped_servers[names[2]]
    assert Counter(r["server"] for r in records)[names[2]] == shares[names[2]].succeeded


async def test_all_servers_lost_fails_after_the_deadline_and_a_rerun_finishes(
    fleet, registered_block_type, tmp_path
):
    names = await save_fleet("fleet-all", fleet)
    source = write_input(tmp_path / "in.jsonl", 300)
    target = tmp_path / "out.jsonl"
    run = asyncio.create_task(
        llamacpp_batch_flow(
            str(source),
            str(target),
            server=names,
            return_state=True,
            request={"max_tokens": 32, "extra_body": LONG},
            run={"ready_timeout": 3},
        )
    )
    await wait_for_lines(target, 40, run)
    for server in fleet:
        server.kill()
    state = await run
    assert state.is_failed() and "no llama-server of the fleet was usable" in state.message
    done_before = successes(read_output(target))
    assert sum(done_before.values()) >= 40 and set(done_before.values()) == {1}

    for server in fleet:
        server.start()
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=names, request={"max_tokens": 32, "extra_body": LONG}
    )
    assert summary.skipped_done == sum(done_before.values())
    assert successes(read_output(target)) == Counter({f"q{i}": 1 for i in range(300)})


async def test_a_server_with_a_wrong_key_is_skipped_and_named(
    llama_server_bin, tiny_model, key_server, server, registered_block_type, tmp_path
):
    names = [
        *await save_fleet("fleet-keyed", [key_server], keys={0: SECRET_KEY + "-wrong"}),
        *await save_fleet("fleet-open", [server]),
    ]
    source = write_input(tmp_path / "in.jsonl", 20)
    target = tmp_path / "out.jsonl"
    state = await llamacpp_batch_flow(
        str(source), str(target), server=names, return_state=True, request={"max_tokens": 4}
    )
    assert state.is_completed(), state.message
    summary = await state.aresult()
    assert "unauthorized" in summary.skipped_servers[names[0]]
    assert {r["server"] for r in read_output(target)} == {names[1]}
    record = await flow_run_record(state.state_details.flow_run_id)
    assert names[0] in record["text"] and "unauthorized" in record["text"]
    for text in (record["text"], target.read_text(), json.dumps(summary.model_dump())):
        assert SECRET_KEY not in text


async def test_lines_naming_a_model_go_only_to_servers_that_serve_it(
    fleet, registered_block_type, tmp_path
):
    names = await save_fleet("fleet-models", fleet[:2])
    source = tmp_path / "in.jsonl"
    lines = [{"custom_id": f"one-{i}", "prompt": "x", "model": "tiny-1"} for i in range(10)]
    lines += [{"custom_id": f"two-{i}", "prompt": "x", "model": "tiny-2"} for i in range(10)]
    lines += [{"custom_id": f"any-{i}", "prompt": "x"} for i in range(10)]
    lines += [{"custom_id": "nobody", "prompt": "x", "model": "gpt-4o-mini"}]
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    target = tmp_path / "out.jsonl"
    summary = await llamacpp_batch_flow(
        str(source), str(target), server=names, request={"max_tokens": 4}
    )
    by_id = {record["custom_id"]: record for record in read_output(target)}
    assert all(by_id[f"one-{i}"]["server"] == names[0] for i in range(10))
    assert all(by_id[f"two-{i}"]["server"] == names[1] for i in range(10))
    assert all(by_id[f"any-{i}"]["error"] is None for i in range(10))
    assert by_id["nobody"]["error"]["kind"] == "no_server_for_model"
    assert "ignore_line_models" in by_id["nobody"]["error"]["message"]
    assert summary.failed_by_kind == {"no_server_for_model": 1}


async def test_health_over_a_fleet_one_down(
    fleet, registered_block_type, asserting_events_worker, reset_worker_events
):
    from prefect_llamacpp.flows.health import llamacpp_health_flow

    names = await save_fleet("fleet-health", fleet)
    fleet[1].kill()
    state = await llamacpp_health_flow(names, return_state=True)
    assert state.is_failed()
    assert "2 of 3 llama-servers ready" in state.message and names[1] in state.message
    assert names[0] not in state.message.split("ready (")[1]
    record = await flow_run_record(state.state_details.flow_run_id)
    (artifact,) = [a for a in record["artifacts"] if a.key == "llamacpp-health-fleet"]
    rows = [line for line in artifact.data.splitlines() if line.startswith("| fleet-health")]
    assert len(rows) == 3 and "**unreachable**" in rows[1]
    assert "**2 of 3 ready**" in artifact.data and "/ 5 |" in artifact.data  # 1 + 4 slots up
    asserting_events_worker.drain()
    events = [
        e for e in asserting_events_worker._client.events if e.event.startswith("llamacpp.server.")
    ]
    by_server = {e.resource.name: e.event for e in events}
    assert by_server == {
        names[0]: "llamacpp.server.ready",
        names[1]: "llamacpp.server.unreachable",
        names[2]: "llamacpp.server.ready",
    }

    state = await llamacpp_health_flow(
        names, min_ready=2, canary={"send": False}, return_state=True
    )
    assert state.is_completed(), state.message
    report = await state.result()
    assert [row.server for row in report.servers] == names and report.ready == 2
    assert [row.status.state for row in report.servers] == ["ready", "unreachable", "ready"]
