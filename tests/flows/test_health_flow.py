"""The health flow against real llama-servers, under Prefect's test harness."""

from __future__ import annotations

import pytest

from harness.server import free_port
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.flows.health import artifact_key, llamacpp_health_flow
from tests.conftest import SECRET_KEY
from tests.flows.conftest import flow_run_record
from tests.servers import long_generation
from tests.stalling_proxy import StallingProxy

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
    status = (await state.result()).status
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
    report = await llamacpp_health_flow("it-down-ok", fail_when_not_ready=False)
    assert report.status.state == "unreachable" and report.ready == 0
    assert [row.server for row in report.servers] == ["it-down-ok"]


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
    assert (await state.result()).status.model_id == "tiny-secure"
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
    # With no name and no `llamacpp` block saved, the environment is used, and said so.
    state = await llamacpp_health_flow(canary={"send": False}, return_state=True)
    assert state.is_completed(), state.message
    record = await flow_run_record(state.state_details.flow_run_id)
    assert "using the LLAMACPP_* environment settings" in record["logs"]


# -- the canary: latency, busy, wedged ----------------------------------------------------


async def test_ready_event_and_artifact_carry_the_canary_latency(
    server, registered_block_type, asserting_events_worker, reset_worker_events
):
    await save_block("it-latency", server.openai_base)
    state = await llamacpp_health_flow("it-latency", return_state=True)
    assert state.is_completed(), state.message
    record = await flow_run_record(state.state_details.flow_run_id)
    (artifact,) = [a for a in record["artifacts"] if a.key == artifact_key("it-latency")]
    assert "| Canary | answered |" in artifact.data
    assert "Canary time to first byte" in artifact.data and " ms |" in artifact.data

    asserting_events_worker.drain()
    (event,) = events_named(asserting_events_worker)
    latency = event.payload["latency"]
    assert latency["ttfb_s"] > 0 and latency["total_s"] >= latency["ttfb_s"]
    assert latency["prompt_tokens_per_s"] > 0
    assert event.payload["canary"] == "answered"


async def test_latency_keys_are_in_every_event_even_without_a_canary(
    registered_block_type, asserting_events_worker, reset_worker_events
):
    await save_block("it-down-latency", f"http://127.0.0.1:{free_port()}/v1")
    await llamacpp_health_flow("it-down-latency", return_state=True)
    await save_block("it-no-canary", "http://127.0.0.1:9/v1")
    await llamacpp_health_flow("it-no-canary", canary={"send": False}, return_state=True)
    asserting_events_worker.drain()
    down, off = events_named(asserting_events_worker)
    assert down.payload["latency"] == off.payload["latency"]
    assert set(down.payload["latency"]) == {
        "ttfb_s",
        "total_s",
        "prompt_tokens_per_s",
        "predicted_tokens_per_s",
    }
    assert set(down.payload["latency"].values()) == {None}
    assert down.payload["canary"] == "not sent: the server is unreachable"
    assert off.payload["canary"] == "not sent: turned off"


async def test_busy_server_does_not_fail_the_run(
    busy_server, registered_block_type, asserting_events_worker, reset_worker_events
):
    await save_block("it-busy", busy_server.openai_base)
    async with long_generation(busy_server):
        state = await llamacpp_health_flow(
            "it-busy", canary={"first_byte_timeout": 1}, return_state=True
        )
        strict = await llamacpp_health_flow(
            "it-busy", canary={"first_byte_timeout": 1}, fail_when_busy=True, return_state=True
        )
    assert state.is_completed(), state.message
    assert (await state.result()).status.state == "busy"
    assert strict.is_failed() and "busy" in strict.message
    record = await flow_run_record(state.state_details.flow_run_id)
    (artifact,) = [a for a in record["artifacts"] if a.key == artifact_key("it-busy")]
    assert "**busy**" in artifact.data and "Progress while the canary waited" in artifact.data
    assert "1 / 1" in artifact.data  # the slot is taken
    asserting_events_worker.drain()
    event = events_named(asserting_events_worker)[0]
    assert event.event == "llamacpp.server.busy"
    assert event.payload["canary"] == "missed its first-byte deadline"
    assert event.payload["latency"]["ttfb_s"] is None


async def test_wedged_server_fails_the_run(
    server, registered_block_type, asserting_events_worker, reset_worker_events
):
    # A real server behind a stalling proxy (tests/stalling_proxy.py): /health ok, completions hang.
    with StallingProxy(server.url) as proxy:
        await save_block("it-wedged", f"{proxy.url}/v1")
        state = await llamacpp_health_flow(
            "it-wedged", canary={"first_byte_timeout": 1}, return_state=True
        )
    assert state.is_failed()
    assert "wedged" in state.message and "nothing progresses" in state.message
    asserting_events_worker.drain()
    (event,) = events_named(asserting_events_worker)
    assert event.event == "llamacpp.server.wedged"
    assert event.resource.id == "llamacpp.server.it-wedged"
    assert event.payload["latency"]["ttfb_s"] is None


def test_the_command_line_reads_the_flows_options(monkeypatch):
    """`llamacpp-health` flags are the flow's parameters: the canary's from its model."""
    from prefect_llamacpp.flows import health

    asked = {}

    async def fake_flow(**parameters):
        asked.update(parameters)

        class Done:
            def is_completed(self):
                return True

        return Done()

    monkeypatch.setattr(health, "llamacpp_health_flow", fake_flow)
    argv = ["a", "b", "--first-byte-timeout", "3", "--no-canary.send", "--min-ready", "1"]
    assert health.main(argv) == 0
    assert asked["server"] == ["a", "b"] and asked["min_ready"] == 1
    assert asked["canary"].first_byte_timeout == 3 and asked["canary"].send is False
    assert health.main(["one"]) == 0 and asked["server"] == "one" and asked["canary"].send
    assert health.main(["--min-ready", "-1"]) == 2


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--first-byte-timeout", "inf"], "--canary.first-byte-timeout: Input should be a finite"),
        (["--canary", "{bad"], "--canary: not a JSON object"),
    ],
)
def test_the_command_line_refuses_in_one_line(capsys, argv, says):
    from prefect_llamacpp.flows import health

    assert health.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
