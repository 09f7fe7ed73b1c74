"""The canary against real llama-servers: latency, busy, wedged, sleeping, router mode.

Busy is real: one slot, a long generation in flight. Wedged needs a server that answers
/health but never finishes a completion, which a real llama-server cannot be made to do on
demand: those tests put a small stalling proxy (tests/stalling_proxy.py) in front of a real
server. Everything but the completion is the real server's answer.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from harness.server import LlamaServer
from prefect_llamacpp import ServerState, llamacpp_health_check
from prefect_llamacpp.canary import CanaryOptions, observe_progress
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppSettings
from tests.conftest import SECRET_KEY
from tests.servers import long_generation, settings_for
from tests.stalling_proxy import StallingProxy

pytestmark = pytest.mark.integration

QUICK = CanaryOptions(first_byte_timeout=1.0, total_timeout=3.0, progress_interval=1.0)
# Where an answer is expected: a loaded machine can take longer than QUICK to give the first byte.
AT_EASE = CanaryOptions(first_byte_timeout=15.0, total_timeout=30.0, progress_interval=1.0)


async def test_a_model_that_thinks_first_answers_the_canary(thinking_server):
    # The one token of the canary is a thought: streamed as reasoning_content, no content (or,
    # when the thought is blank, no delta at all before the closing event).
    async with httpx.AsyncClient(timeout=30) as http:
        stream = await http.post(
            f"{thinking_server.openai_base}/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Say OK."}],
                "max_tokens": 1,
                "stream": True,
                "temperature": 0,  # a token that is a thought (a blank one would be dropped)
            },
        )
    deltas = [line for line in stream.text.splitlines() if line.startswith("data: {")]
    assert any('"reasoning_content"' in line for line in deltas), stream.text
    assert not any('"content":"' in line for line in deltas), stream.text
    status = await llamacpp_health_check(settings_for(thinking_server), canary=True)
    assert status.state == ServerState.READY, status.error
    assert status.canary == "answered"
    assert status.latency.ttfb_s is not None


async def test_ready_server_answers_the_canary_with_latency(server):
    async with httpx.AsyncClient(timeout=60) as http:  # some real work for the tokens/s figures
        answer = await http.post(
            f"{server.openai_base}/chat/completions",
            # 256 tokens, no early stop: over the 10 ms of generation the figure needs, even
            # on a fast machine (64 once ended early enough to leave it unmeasured).
            json={
                "messages": [{"role": "user", "content": "count"}],
                "max_tokens": 256,
                "ignore_eos": True,
            },
        )
        assert answer.status_code == 200
    status = await llamacpp_health_check(settings_for(server), canary=True)
    assert status.state == ServerState.READY, status.error
    latency = status.latency
    assert 0 < latency.ttfb_s <= latency.total_s < 5
    assert latency.prompt_tokens_per_s > 0  # --metrics is on: counters / seconds
    assert latency.predicted_tokens_per_s > 0
    assert status.canary == "answered"


async def test_the_canary_is_one_token(server):
    async with LlamaCppClient(server.url, api_key=None) as client:
        before = await client.get_metrics()
        probe = await client.probe_completion("tiny")
        after = await client.get_metrics()
    assert probe.finish_reason == "length"
    assert after["tokens_predicted_total"] - before["tokens_predicted_total"] == 1


async def test_wrong_key_stops_before_the_canary(key_server):
    settings = settings_for(key_server, api_key="wrong-key")
    status = await llamacpp_health_check(settings, canary=True)
    assert status.state == ServerState.UNAUTHORIZED
    status = await llamacpp_health_check(settings_for(key_server, api_key=SECRET_KEY), canary=True)
    assert status.state == ServerState.READY and status.latency.ttfb_s > 0
    # No --metrics on this server: no tokens/s, and that is not a fault.
    assert status.latency.prompt_tokens_per_s is None


async def test_one_slot_busy_with_a_long_generation_is_busy_not_wedged(busy_server):
    async with long_generation(busy_server) as generation:
        started = time.monotonic()
        status = await llamacpp_health_check(settings_for(busy_server), canary=QUICK)
        took = time.monotonic() - started
        assert not generation.done()
    assert status.state == ServerState.BUSY, status.error
    assert status.is_ready
    assert status.deadline_missed == "first_byte"
    assert "requests_processing 1" in status.progress
    assert status.latency.ttfb_s is None
    assert took < 30  # deadline + two progress reads, not the generation's length


async def test_slots_alone_also_see_the_long_generation_progress(busy_server):
    # The /slots path, for servers without --metrics: same busy server, metrics ignored.
    async with (
        long_generation(busy_server),
        LlamaCppClient(busy_server.url, api_key=None) as client,
    ):
        progress = await observe_progress(
            client, model=None, metrics=False, slots=True, interval=1.0
        )
    assert progress.seen is True, progress.evidence


async def test_idle_server_behind_a_stalling_proxy_is_wedged(server):
    with StallingProxy(server.url, mode="stall") as proxy:
        settings = LlamaCppSettings(base_url=proxy.url, timeout=10)
        status = await llamacpp_health_check(settings, canary=QUICK)
        assert proxy.completions_seen == 1
    assert status.state == ServerState.WEDGED, status.error
    assert not status.is_ready
    assert status.server_status == "ok"  # the real /health, through the proxy
    assert "did not send a first token" in status.error
    assert "nothing progresses" in status.error


@pytest.mark.parametrize(
    ("mode", "why"),
    [("error", "Compute error"), ("drop", "RemoteProtocolError")],
)
async def test_completions_failing_behind_a_healthy_health_are_wedged(server, mode, why):
    with StallingProxy(server.url, mode=mode) as proxy:
        settings = LlamaCppSettings(base_url=proxy.url, timeout=10)
        status = await llamacpp_health_check(settings, canary=QUICK)
    assert status.state == ServerState.WEDGED, status.error
    assert why in status.error


async def test_sleeping_server_is_still_asleep_after_the_check(
    llama_server_bin, tiny_model, tmp_path
):
    server = LlamaServer(
        tiny_model,
        ["--sleep-idle-seconds", "1", "--metrics"],
        binary=llama_server_bin,
        log_dir=tmp_path,
    )
    with server:
        settings = settings_for(server)
        for _ in range(100):  # falls asleep ~1 s after its last task
            if (await llamacpp_health_check(settings)).state == ServerState.SLEEPING:
                break
            await asyncio.sleep(0.1)
        for _ in range(3):
            status = await llamacpp_health_check(settings, canary=QUICK)
            assert status.state == ServerState.SLEEPING
            assert "asleep" in status.canary
        await asyncio.sleep(1.5)  # a woken server would still be awake (idle timer: 1 s)
        async with httpx.AsyncClient() as http:
            props = (await http.get(f"{server.url}/props")).json()
        assert props["is_sleeping"] is True, "the canary woke the server"


async def test_router_check_loads_no_model_and_probes_only_a_loaded_one(router_server):
    settings = settings_for(router_server)
    async with LlamaCppClient(router_server.url, api_key=None) as client:
        status = await llamacpp_health_check(settings, canary=QUICK)
        assert status.state == ServerState.READY and status.model_id is None
        assert "no model is loaded" in status.canary
        await asyncio.sleep(1)  # an autoload would be under way by now
        assert await _router_statuses(client) == {"alpha": "unloaded", "beta": "unloaded"}

        await client.load_model("beta")
        try:
            await _wait_for(client, "beta", "loaded")
            status = await llamacpp_health_check(settings, canary=AT_EASE)
            assert status.state == ServerState.READY, status.error
            assert status.model_id == "beta"
            assert status.latency.ttfb_s > 0
            assert (await _router_statuses(client))["alpha"] == "unloaded"
            # The loaded model's own /props (the router's says nothing of templates), and the
            # schema canary, which loads nothing either.
            schema = AT_EASE.model_copy(update={"structured_output": True})
            status = await llamacpp_health_check(settings, canary=schema)
            assert status.capabilities is not None and status.capabilities.from_template
            assert status.structured_output == "enforced", status.error
            assert (await _router_statuses(client))["alpha"] == "unloaded"

            # The configured model is not loaded: the canary goes to the loaded one, or nowhere.
            status = await llamacpp_health_check(
                settings_for(router_server, model_name="alpha"), canary=AT_EASE
            )
            assert status.model_id == "beta"
            assert (await _router_statuses(client))["alpha"] == "unloaded"
        finally:
            await client.unload_model("beta")
            await _wait_for(client, "beta", "unloaded")


async def test_server_dying_between_the_reads_and_the_canary_is_unreachable(
    llama_server_bin, tiny_model, tmp_path
):
    server = LlamaServer(tiny_model, ["--metrics"], binary=llama_server_bin, log_dir=tmp_path)
    with server, StallingProxy(server.url, mode="drop", on_completion=server.kill) as proxy:
        # /health, /props and /v1/models are answered; the canary's arrival kills the server.
        settings = LlamaCppSettings(base_url=proxy.url, timeout=5)
        status = await llamacpp_health_check(settings, canary=QUICK)
        assert proxy.completions_seen == 1
    assert status.state == ServerState.UNREACHABLE, status.error
    assert not status.connected


async def _router_statuses(client: LlamaCppClient) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in await client.list_models()}


async def _wait_for(client: LlamaCppClient, model: str, wanted: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await _router_statuses(client))[model] != wanted:
        assert time.monotonic() < deadline, f"{model} never became {wanted}"
        await asyncio.sleep(0.1)
