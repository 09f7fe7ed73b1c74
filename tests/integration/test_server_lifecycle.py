"""States that need a server to change: loading, sleeping, dying; and pydantic-ai on a real server."""

from __future__ import annotations

import asyncio
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.output import NativeOutput

from harness.models import ensure_model
from harness.server import LlamaServer, free_port
from prefect_llamacpp import ServerState, create_llamacpp_model_async, llamacpp_health_check
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.exceptions import ServerNotReadyError
from tests.servers import settings_for

pytestmark = pytest.mark.integration


async def test_loading_then_ready(llama_server_bin, tmp_path):
    # --load-mode none reads the 1.3 GB file instead of mapping it: seconds of 503 "Loading model".
    server = LlamaServer(
        ensure_model("slow-load"),
        ["-lm", "none", "-np", "1"],
        binary=llama_server_bin,
        log_dir=tmp_path,
    )
    server.start(wait="listening")
    try:
        settings = settings_for(server)
        status = await llamacpp_health_check(settings)
        assert status.state == ServerState.LOADING, server.log_tail()
        assert status.connected and "loading" in status.error
        with pytest.raises(ServerNotReadyError, match="still loading the model"):
            await create_llamacpp_model_async(settings=settings)
        async with LlamaCppClient(server.url, api_key=None) as client:
            await client.wait_until_ready(timeout=120, poll_interval=0.1)
        status = await llamacpp_health_check(settings)
        assert status.state == ServerState.READY
    finally:
        server.stop()


async def test_sleeping_is_reported_and_not_woken(llama_server_bin, tiny_model, tmp_path):
    server = LlamaServer(
        tiny_model, ["--sleep-idle-seconds", "1"], binary=llama_server_bin, log_dir=tmp_path
    )
    with server:
        settings = settings_for(server)
        status = None
        for _ in range(100):  # the server falls asleep ~1 s after its last task
            status = await llamacpp_health_check(settings)
            if status.state == ServerState.SLEEPING:
                break
            await asyncio.sleep(0.1)
        assert status.state == ServerState.SLEEPING
        assert status.is_sleeping is True
        assert status.is_ready
        for _ in range(3):
            await llamacpp_health_check(settings)
        async with httpx.AsyncClient() as http:
            props = (await http.get(f"{server.url}/props")).json()
        assert props["is_sleeping"] is True, "the health check woke the server"


async def test_nothing_listening_is_unreachable():
    settings = LlamaCppSettings(base_url=f"http://127.0.0.1:{free_port()}/v1", timeout=2)
    status = await llamacpp_health_check(settings)
    assert status.state == ServerState.UNREACHABLE
    assert not status.connected
    with pytest.raises(ServerNotReadyError, match="unreachable"):
        await create_llamacpp_model_async(settings=settings)
    async with LlamaCppClient(settings.base_url, api_key=None) as client:
        with pytest.raises(ServerNotReadyError, match="unreachable") as info:
            await client.wait_until_ready(timeout=0.5, poll_interval=0.1)
    assert info.value.last_state == "unreachable"


async def test_server_dying_mid_test_becomes_unreachable(llama_server_bin, tiny_model, tmp_path):
    server = LlamaServer(tiny_model, [], binary=llama_server_bin, log_dir=tmp_path).start()
    settings = settings_for(server)
    assert (await llamacpp_health_check(settings)).state == ServerState.READY
    server.kill()
    status = await llamacpp_health_check(settings)
    assert status.state == ServerState.UNREACHABLE
    assert "cannot reach" in status.error


class Review(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    confident: bool


async def test_agent_gets_text(server):
    model = await create_llamacpp_model_async(settings=settings_for(server))
    assert model.model_name == "tiny"
    agent = Agent(model, model_settings={"max_tokens": 16})
    result = await agent.run("Say hello.")
    assert isinstance(result.output, str) and result.output
    assert result.usage.output_tokens > 0


async def test_agent_gets_a_validated_object_through_the_grammar(server):
    model = await create_llamacpp_model_async(settings=settings_for(server))
    agent = Agent(model, output_type=NativeOutput(Review), model_settings={"max_tokens": 256})
    for _ in range(3):  # random weights: the grammar alone makes each answer valid
        result = await agent.run("Review: the soup was fine.")
        assert isinstance(result.output, Review)
