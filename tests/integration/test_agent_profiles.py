"""pydantic-ai agents on real llama-servers whose chat templates differ: `tiny` (ChatML, no
tools, no thinking) and `tiny-tools` (renders tool calls, switches thinking with
`enable_thinking`). The profile comes from each server's /props.

Random weights answer at random, so what they cannot prove is stated, not faked: they never
choose to call a tool, and what they write is noise. What they do prove: what each server says
it can do, that every request shape our model sends is one the server's template renders and
accepts (read back through `/apply-template`, which renders exactly what a completion would),
and that a structured answer comes back through the server's grammar."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import httpx2
import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import (
    ModelRequest,
    ModelResponse,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)

from prefect_llamacpp import (
    CanaryOptions,
    LlamaCppModel,
    create_llamacpp_model_async,
    llamacpp_health_check,
)
from prefect_llamacpp.config import LlamaCppSettings
from tests.stalling_proxy import StallingProxy

pytestmark = pytest.mark.integration


class City(BaseModel):
    # A few names: a random model under the grammar picks one at once, where a free string
    # could run past any max_tokens.
    name: Literal["Paris", "Rome", "Oslo"]


class Recorder:
    """An HTTP client for the model that keeps each chat body it sends, to render it through
    the server's `/apply-template` afterwards."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.http = httpx2.AsyncClient(timeout=120, event_hooks={"request": [self._keep]})

    async def _keep(self, request) -> None:
        if request.url.path.endswith("/chat/completions"):
            self.bodies.append(json.loads(request.content))


async def model_for(server, http=None) -> LlamaCppModel:
    settings = LlamaCppSettings(base_url=server.url, timeout=30)
    model = await create_llamacpp_model_async(settings=settings, http_client=http)
    assert isinstance(model, LlamaCppModel)
    return model


async def rendered(server, body: dict) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.post(f"{server.url}/apply-template", json=body)
    answer.raise_for_status()
    return answer.json()["prompt"]


async def test_the_profile_differs_as_the_templates_do(server, tools_server):
    plain, tools = (await model_for(server)), (await model_for(tools_server))
    assert plain.capabilities.tool_calls is False and plain.capabilities.thinking_switch is False
    assert tools.capabilities.tool_calls and tools.capabilities.thinking_switch
    assert plain.profile.get("supports_tools") is False
    assert plain.profile.get("default_structured_output_mode") == "native"
    assert tools.profile.get("supports_tools") and tools.profile.get("supports_thinking")
    assert tools.profile.get("default_structured_output_mode") == "tool"
    assert tools.profile.get("context_window") == 2048  # 4096 over 2 slots


@pytest.mark.parametrize("which", ["server", "tools_server"])
async def test_an_answer_alone_comes_back_structured_through_the_grammar(request, which):
    """The answer-alone order: NativeOutput (the default where tools cannot be rendered) makes
    the server's grammar write the JSON; random weights then give a valid City every time."""
    running = request.getfixturevalue(which)
    agent = Agent(await model_for(running), output_type=NativeOutput(City))
    result = await agent.run("Name a city.", model_settings={"max_tokens": 64})
    assert isinstance(result.output, City)


async def test_tools_then_an_answer_on_a_template_that_renders_them(tools_server):
    """The tools-then-answer order: the first request offers the agent's tool and the output
    tool (no grammar that would block a call); after a tool call and its result the history
    goes back to the server. Each body renders through the server's own template and the
    server accepts it. Random weights never choose to call a tool, so the call is the one a
    model would make, given as history; the run then ends as any tool-output run does."""
    recorder = Recorder()
    model = await model_for(tools_server, recorder.http)
    agent = Agent(model, output_type=City, retries=0)

    @agent.tool_plain
    def weather(city: str) -> str:
        return f"sunny in {city}"

    history = [
        ModelRequest(parts=[UserPromptPart("Where is it sunny?")]),
        ModelResponse(parts=[ToolCallPart("weather", {"city": "Paris"}, tool_call_id="c1")]),
        ModelRequest(parts=[ToolReturnPart("weather", "sunny in Paris", tool_call_id="c1")]),
    ]
    with pytest.raises(Exception):  # noqa: B017 - noise is never a call to final_result
        await agent.run(message_history=history, model_settings={"max_tokens": 8})
    (body,) = recorder.bodies[:1]
    assert {tool["function"]["name"] for tool in body["tools"]} == {"weather", "final_result"}
    assert body["tool_choice"] == "required" and "response_format" not in body
    prompt = await rendered(tools_server, body)
    assert '"name": "weather"' in prompt and '"name": "final_result"' in prompt  # offered
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny in Paris\n</tool_response>" in prompt
    # The server took the request (the answer was noise, not an error status).
    async with httpx.AsyncClient(timeout=60) as http:
        accepted = await http.post(f"{tools_server.url}/v1/chat/completions", json=body)
    assert accepted.status_code == 200, accepted.text


async def test_tools_are_refused_where_the_template_cannot_render_them(server):
    """The tiny ChatML template has no tools: llama-server would drop them silently and the
    model would never call one, so the request is refused before it is sent."""
    recorder = Recorder()
    agent = Agent(await model_for(server, recorder.http), output_type=City)
    agent.tool_plain(lambda city: city, name="weather")
    with pytest.raises(UserError, match="cannot render tool calls"):
        await agent.run("Where is it sunny?")
    assert recorder.bodies == []


@pytest.mark.parametrize(("thinking", "opened"), [(False, False), (True, True)])
async def test_thinking_reaches_the_template_as_enable_thinking(tools_server, thinking, opened):
    recorder = Recorder()
    agent = Agent(await model_for(tools_server, recorder.http))
    await agent.run("Hi", model_settings={"thinking": thinking, "max_tokens": 4})
    body = recorder.bodies[0]
    assert body["chat_template_kwargs"] == {"enable_thinking": thinking}
    prompt = await rendered(tools_server, body)
    assert prompt.endswith("<think>\n") == opened
    assert prompt.endswith("<think>\n\n</think>\n\n") == (not opened)


async def test_the_canary_reports_a_reasoning_template_ready(tools_server):
    """The first streamed byte of a reasoning model may be a thought: it still counts."""
    status = await llamacpp_health_check(LlamaCppSettings(base_url=tools_server.url), canary=True)
    assert status.state == "ready" and status.latency.ttfb_s is not None, status.error


@pytest.mark.parametrize("which", ["server", "tools_server"])
async def test_the_schema_canary_passes_where_the_grammar_is_applied(request, which):
    running = request.getfixturevalue(which)
    status = await llamacpp_health_check(
        LlamaCppSettings(base_url=running.url), canary=CanaryOptions(structured_output=True)
    )
    assert status.state == "ready" and status.structured_output == "enforced", status.error


async def test_the_schema_canary_fails_where_the_server_ignores_the_schema(server):
    """A 200 with no grammar (llama.cpp #19051): the proxy drops `response_format` on its way
    to the real server, which then answers freely."""
    with StallingProxy(server.url, mode="no_grammar") as ignoring:
        status = await llamacpp_health_check(
            LlamaCppSettings(base_url=ignoring.url),
            canary=CanaryOptions(structured_output=True),
        )
    assert status.state == "error", status.error
    assert status.structured_output == "not enforced"
    assert "does not enforce a JSON schema" in status.error
    assert status.canary == "answered, but ignored the JSON schema"
