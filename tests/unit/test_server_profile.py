"""The model's profile from the server's /props, not from its name: tools only where the chat
template renders tool calls, pydantic-ai's `thinking` sent as `enable_thinking` where the
template reads it, and the requests llama-server would get wrong refused before they are sent.
The server's answers are played back here; tests/integration/test_agent_profiles.py runs the
same against llama-servers whose templates differ."""

from __future__ import annotations

import json

import httpx2
import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, NativeOutput, PromptedOutput, ToolOutput
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import (
    BinaryContent,
    ImageUrl,
    ModelRequest,
    ModelResponse,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)

from prefect_llamacpp import (
    LlamaCppModel,
    ServerCapabilities,
    create_llamacpp_model,
    llamacpp_model_settings,
)
from prefect_llamacpp.config import LlamaCppSettings

TOOLS_AND_SWITCH = {
    "chat_template": "{% if enable_thinking is defined %}<think>{% endif %}{{ tools }}",
    "chat_template_caps": {"supports_tool_calls": True, "supports_tools": True},
    "modalities": {"vision": True, "audio": False},
    "default_generation_settings": {"n_ctx": 4096},
}
PLAIN = {
    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "chat_template_caps": {"supports_tool_calls": False, "supports_tools": False},
    "modalities": {"vision": False},
    "default_generation_settings": {"n_ctx": 512},
}


class City(BaseModel):
    name: str


def answer(content: str = '{"name": "Paris"}', tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": content, "tool_calls": tool_calls}
    return {
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        "model": "m",
        "object": "chat.completion",
        "id": "x",
        "created": 1,
    }


def call(name: str, arguments: dict) -> dict:
    return {
        "id": f"call-{name}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def model_over(props: dict, answers: list[dict], sent: list[dict]) -> LlamaCppModel:
    def reply(request):
        sent.append(json.loads(request.content))
        return httpx2.Response(200, json=answers[len(sent) - 1])

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(reply))
    model = create_llamacpp_model(
        "some-model.gguf",
        LlamaCppSettings(base_url="http://llama:8080/v1"),
        http_client=http,
        capabilities=ServerCapabilities.from_props(props),
    )
    assert isinstance(model, LlamaCppModel)
    return model


def test_capabilities_come_from_the_template_and_odd_props_read_as_nothing():
    rich = ServerCapabilities.from_props(TOOLS_AND_SWITCH)
    assert (rich.tool_calls, rich.thinking_switch, rich.vision, rich.n_ctx) == (
        True,
        True,
        True,
        4096,
    )
    assert rich.summary() == "tools, thinking switch, vision; n_ctx 4096"
    plain = ServerCapabilities.from_props(PLAIN)
    assert not plain.tool_calls and not plain.thinking_switch and plain.summary().startswith("text")
    odd = ServerCapabilities.from_props(
        {
            "chat_template": 5,
            "chat_template_caps": {"supports_tool_calls": "yes"},
            "modalities": [],
            "default_generation_settings": {"n_ctx": True},
        }
    )
    assert not odd.tool_calls and odd.n_ctx is None and odd.from_template
    assert not ServerCapabilities.from_props({}).from_template  # an old server: name profile


def test_the_profile_follows_the_server_not_the_name():
    rich = model_over(TOOLS_AND_SWITCH, [], []).profile
    assert rich.get("supports_tools") and rich.get("supports_thinking")
    assert rich.get("default_structured_output_mode") == "tool"
    assert rich.get("supports_image_input") and rich.get("context_window") == 4096
    plain = model_over(PLAIN, [], []).profile
    assert plain.get("supports_tools") is False and plain.get("supports_thinking") is False
    assert plain.get("default_structured_output_mode") == "native"
    assert plain.get("supports_json_schema_output")  # the grammar: structured output still works


async def test_tools_then_a_structured_answer_through_an_output_tool():
    sent: list[dict] = []
    answers = [
        answer("", [call("weather", {"city": "Paris"})]),
        answer("", [call("final_result", {"name": "Paris"})]),
    ]
    agent = Agent(model_over(TOOLS_AND_SWITCH, answers, sent), output_type=City)

    @agent.tool_plain
    def weather(city: str) -> str:
        return f"sunny in {city}"

    result = await agent.run("Where is it sunny?")
    assert result.output == City(name="Paris")
    assert {tool["function"]["name"] for tool in sent[0]["tools"]} == {"weather", "final_result"}
    assert "response_format" not in sent[0]  # no grammar that would block the tool call
    assert sent[1]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call-weather",
        "content": "sunny in Paris",
    }


async def test_an_answer_alone_through_the_grammar_on_a_server_without_tools():
    sent: list[dict] = []
    agent = Agent(model_over(PLAIN, [answer()], sent), output_type=City)
    assert (await agent.run("A city?")).output == City(name="Paris")
    assert sent[0]["response_format"]["type"] == "json_schema" and "tools" not in sent[0]
    # the schema is in the instructions too (pydantic-ai #3490)
    assert "name" in sent[0]["messages"][0]["content"]


@pytest.mark.parametrize("output", [ToolOutput(City), PromptedOutput(City)])
async def test_the_modes_that_work_with_tools_are_taken(output):
    sent: list[dict] = []
    final = (
        answer("", [call("final_result", {"name": "Rome"})])
        if isinstance(output, ToolOutput)
        else answer('{"name": "Rome"}')
    )
    agent = Agent(model_over(TOOLS_AND_SWITCH, [final], sent), output_type=output)
    agent.tool_plain(lambda city: city, name="echo")
    assert (await agent.run("A city?")).output == City(name="Rome")
    assert "response_format" not in sent[0] or isinstance(output, PromptedOutput)


async def test_native_output_with_tools_is_refused_saying_why():
    sent: list[dict] = []
    agent = Agent(model_over(TOOLS_AND_SWITCH, [], sent), output_type=NativeOutput(City))
    agent.tool_plain(lambda city: city, name="echo")
    with pytest.raises(UserError, match="NativeOutput with tools.*ToolOutput"):
        await agent.run("A city?")
    assert sent == []  # refused before anything was sent


async def test_tools_on_a_template_that_cannot_render_them_are_refused():
    sent: list[dict] = []
    agent = Agent(model_over(PLAIN, [], sent), output_type=City)
    agent.tool_plain(lambda city: city, name="echo")
    with pytest.raises(UserError, match="cannot render tool calls.*--chat-template-file"):
        await agent.run("A city?")
    assert sent == []


@pytest.mark.parametrize(
    ("thinking", "sent_as"), [(False, False), (True, True), ("high", True), (None, None)]
)
async def test_thinking_is_sent_as_enable_thinking_where_the_template_reads_it(thinking, sent_as):
    sent: list[dict] = []
    agent = Agent(model_over(TOOLS_AND_SWITCH, [answer("hi")], sent))
    settings = {} if thinking is None else {"thinking": thinking}
    await agent.run("Hi", model_settings=settings)
    kwargs = sent[0].get("chat_template_kwargs", {})
    assert kwargs.get("enable_thinking") == sent_as
    assert "reasoning_effort" not in sent[0]


async def test_the_callers_own_template_kwargs_win_over_thinking():
    sent: list[dict] = []
    agent = Agent(model_over(TOOLS_AND_SWITCH, [answer("hi")], sent))
    await agent.run(
        "Hi",
        model_settings={
            "thinking": True,
            "llamacpp_chat_template_kwargs": {"enable_thinking": False, "x": 1},
        },
    )
    assert sent[0]["chat_template_kwargs"] == {"enable_thinking": False, "x": 1}


async def test_thinking_is_not_sent_to_a_template_without_the_switch():
    sent: list[dict] = []
    agent = Agent(model_over(PLAIN, [answer("hi")], sent))
    await agent.run("Hi", model_settings={"thinking": False})
    assert "chat_template_kwargs" not in sent[0] and "reasoning_effort" not in sent[0]


async def test_thinking_keeps_the_callers_kwargs_from_extra_body_and_from_the_helper():
    sent: list[dict] = []
    agent = Agent(model_over(TOOLS_AND_SWITCH, [answer("hi"), answer("hi")], sent))
    await agent.run(
        "Hi", model_settings={"thinking": True, "extra_body": {"chat_template_kwargs": {"foo": 1}}}
    )
    assert sent[0]["chat_template_kwargs"] == {"foo": 1, "enable_thinking": True}
    settings = {**llamacpp_model_settings(chat_template_kwargs={"enable_thinking": False})}
    await agent.run("Hi", model_settings={**settings, "thinking": True})
    assert sent[1]["chat_template_kwargs"] == {"enable_thinking": False}


async def test_a_reasoning_name_does_not_beat_a_template_without_the_switch():
    sent: list[dict] = []
    model = create_llamacpp_model(
        "deepseek-r1-distill",
        LlamaCppSettings(base_url="http://llama:8080/v1"),
        http_client=httpx2.AsyncClient(
            transport=httpx2.MockTransport(
                lambda request: (
                    sent.append(json.loads(request.content))
                    or httpx2.Response(200, json=answer("hi"))
                )
            )
        ),
        capabilities=ServerCapabilities.from_props(PLAIN),
    )
    await Agent(model).run("Hi", model_settings={"thinking": False})
    assert "chat_template_kwargs" not in sent[0] and "reasoning_effort" not in sent[0]


async def test_props_that_cannot_be_read_keep_our_checks_and_the_names_profile():
    unknown = ServerCapabilities(from_template=False)
    sent: list[dict] = []
    model = model_over({}, [answer("hi")], sent)
    assert model.capabilities == unknown
    agent = Agent(model, output_type=NativeOutput(City))
    agent.tool_plain(lambda city: city, name="echo")
    with pytest.raises(UserError, match="NativeOutput with tools"):
        await agent.run("A city?")
    tools_agent = Agent(
        model_over({}, [answer("", [call("final_result", {"name": "Oslo"})])], sent),
        output_type=City,
    )
    tools_agent.tool_plain(lambda city: city, name="echo")
    assert (await tools_agent.run("A city?")).output == City(name="Oslo")  # not refused


async def test_images_and_tool_history_the_server_cannot_take_are_refused_before_sending():
    sent: list[dict] = []
    agent = Agent(model_over(PLAIN, [], sent))
    with pytest.raises(UserError, match="cannot read image input.*--mmproj"):
        await agent.run(["What is this?", BinaryContent(b"\x89PNG", media_type="image/png")])
    with pytest.raises(UserError, match="cannot read image input"):
        await agent.run(["What is this?", ImageUrl("http://example.com/a.png")])
    history = [
        ModelRequest(parts=[UserPromptPart("Weather?")]),
        ModelResponse(parts=[ToolCallPart("weather", {"city": "Oslo"}, tool_call_id="c1")]),
        ModelRequest(parts=[ToolReturnPart("weather", "rain", tool_call_id="c1")]),
    ]
    with pytest.raises(UserError, match="history holds tool calls"):
        await agent.run("And tomorrow?", message_history=history)
    assert sent == []
    # where the server can, the same image goes out
    vision = Agent(model_over(TOOLS_AND_SWITCH, [answer("a cat")], sent))
    await vision.run(["What is this?", BinaryContent(b"\x89PNG", media_type="image/png")])
    assert len(sent) == 1


async def test_tool_output_on_a_template_without_tools_names_the_modes_that_work():
    agent = Agent(model_over(PLAIN, [], []), output_type=ToolOutput(City))
    with pytest.raises(UserError, match="ToolOutput needs tool calls.*NativeOutput"):
        await agent.run("A city?")
