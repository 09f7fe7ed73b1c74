"""The health flow against real llama-servers, under Prefect's test harness."""

from __future__ import annotations

import pytest

from blocks.llamacpp import LlamaCppServer
from flows.health import artifact_key, llamacpp_health_flow
from harness.server import free_port
from tests.conftest import SECRET_KEY
from tests.flows.conftest import flow_run_record

pytestmark = pytest.mark.integration


async def save_block(name: str, base_url: str, api_key: str | None = None) -> None:
    await LlamaCppServer(base_url=base_url, api_key=api_key, timeout=5).save(name, overwrite=True)


def events_named(worker, prefix="llamacpp.server."):
    return [event for event in worker._client.events if event.event.startswith(prefix)]


async def test_ready_server_gives_artifact_and_event(
    server, registered_block_type, asserting_events_worker, reset_worker_events
):
    await save_block("it-ready", server.openai_base)
    state = await llamacpp_health_flow("it-ready", return_state=True)
    assert state.is_completed()
    status = await state.result()
    assert status.state == "ready" and status.model_id == "tiny"

    record = await flow_run_record(state.state_details.flow_run_id)
    (artifact,) = [a for a in record["artifacts"] if a.key == artifact_key("it-ready")]
    assert "**ready**" in artifact.data
    assert "tiny" in artifact.data and "0 / 4" in artifact.data  # busy / total slots
    assert "requests_processing" in artifact.data  # --metrics is on

    asserting_events_worker.drain()
    (event,) = events_named(asserting_events_worker)
    assert event.event == "llamacpp.server.ready"
    assert event.resource.id == "llamacpp.server.it-ready"
    assert event.payload["model_id"] == "tiny"
    assert event.payload["total_slots"] == 4


async def test_unreachable_fails_the_run_with_a_clear_message(
    registered_block_type, asserting_events_worker, reset_worker_events
):
    await save_block("it-down", f"http://127.0.0.1:{free_port()}/v1")
    state = await llamacpp_health_flow("it-down", return_state=True)
    assert state.is_failed()
    assert "unreachable" in state.message and "cannot reach llama-server" in state.message
    asserting_events_worker.drain()
    assert [e.event for e in events_named(asserting_events_worker)] == [
        "llamacpp.server.unreachable"
    ]


async def test_unreachable_can_be_reported_without_failing(registered_block_type):
    await save_block("it-down-ok", f"http://127.0.0.1:{free_port()}/v1")
    status = await llamacpp_health_flow("it-down-ok", fail_when_not_ready=False)
    assert status.state == "unreachable"


@pytest.mark.parametrize("api_key", [None, "wrong-key"])
async def test_unauthorized_says_to_set_the_key(
    key_server, registered_block_type, asserting_events_worker, reset_worker_events, api_key
):
    await save_block("it-locked", key_server.openai_base, api_key)
    state = await llamacpp_health_flow("it-locked", return_state=True)
    assert state.is_failed()
    assert "unauthorized" in state.message and "LLAMACPP_API_KEY" in state.message
    record = await flow_run_record(state.state_details.flow_run_id)
    assert "unauthorized" in record["logs"]


async def test_key_appears_nowhere_prefect_keeps(
    key_server, registered_block_type, asserting_events_worker, reset_worker_events
):
    await save_block("it-secure", key_server.openai_base, SECRET_KEY)
    state = await llamacpp_health_flow("it-secure", return_state=True)
    assert state.is_completed(), state.message
    assert (await state.result()).model_id == "tiny-secure"
    record = await flow_run_record(state.state_details.flow_run_id)
    asserting_events_worker.drain()
    events = "\n".join(e.model_dump_json() for e in asserting_events_worker._client.events)
    assert record["logs"] and record["artifacts"] and events
    for text in (record["text"], events, str(state), repr(await state.result())):
        assert SECRET_KEY not in text


async def test_a_missing_named_block_never_falls_back_to_env(
    server, registered_block_type, monkeypatch
):
    monkeypatch.setenv("LLAMACPP_BASE_URL", server.url)  # a typo must not reach another server
    state = await llamacpp_health_flow("no-such-block", return_state=True)
    assert state.is_failed()
    assert "No llama.cpp Server block named 'no-such-block'" in state.message
