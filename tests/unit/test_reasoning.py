"""A reasoning model's `reasoning_content` becomes pydantic-ai thinking, never the answer.

A random-weight model cannot be made to reason on demand, so llama-server's answers are played
back here as it sends them (its default `--reasoning-format` puts thoughts in `reasoning_content`).
"""

from __future__ import annotations

import json

import httpx2
import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.messages import ModelResponse, TextPart, ThinkingPart
from pydantic_ai.models.openai import OpenAIChatModel

from prefect_llamacpp import (
    LlamaCppModel,
    LlamaCppModelSettings,
    create_llamacpp_model,
    llamacpp_model_settings,
)
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.exceptions import ConfigurationError


class Review(BaseModel):
    stars: int


def completion(content: str, reasoning: str) -> dict:
    return {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "reasoning_content": reasoning,
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        "model": "qwen3-8b",
        "object": "chat.completion",
        "id": "x",
        "created": 1,
    }


def stream(reasoning: list[str], content: list[str]) -> bytes:
    """An SSE answer as llama-server streams it: thoughts first, then the answer."""
    deltas = [{"reasoning_content": piece} for piece in reasoning]
    deltas += [{"content": piece} for piece in content]
    events = [
        {
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            "object": "chat.completion.chunk",
            "id": "x",
            "created": 1,
            "model": "qwen3-8b",
        }
        for delta in [{"role": "assistant", "content": None}, *deltas]
    ]
    events.append({**events[-1], "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    lines = [f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def agent_over(answers: list, sent: list[dict], output_type=str, model_class=None) -> Agent:
    """An agent on `create_llamacpp_model` (or a `model_class` on the same provider) whose server
    plays `answers` back in turn."""

    def answer(request):
        sent.append(json.loads(request.content))
        body = answers[len(sent) - 1]
        if isinstance(body, bytes):
            return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=body)

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    model = create_llamacpp_model(
        "qwen3-8b", LlamaCppSettings(base_url="http://llama:8080/v1"), http_client=http
    )
    if model_class is not None:
        model = model_class("qwen3-8b", provider=model._provider)
    return Agent(model, output_type=output_type)


async def test_reasoning_content_becomes_a_thinking_part_and_the_answer_stays_text():
    sent: list[dict] = []
    agent = agent_over([completion("Paris.", "The user asks about France.")], sent)
    result = await agent.run("Capital of France?")
    assert result.output == "Paris."
    response = result.all_messages()[-1]
    assert isinstance(response, ModelResponse)
    thinking = [part for part in response.parts if isinstance(part, ThinkingPart)]
    assert [(part.content, part.id) for part in thinking] == [
        ("The user asks about France.", "reasoning_content")
    ]
    assert [part.content for part in response.parts if isinstance(part, TextPart)] == ["Paris."]


async def test_structured_output_is_parsed_from_the_answer_never_the_reasoning():
    sent: list[dict] = []
    # The thoughts hold JSON that would fail validation; only the answer counts.
    answers = [completion('{"stars": 4}', 'Maybe {"stars": "five"}? No.')]
    agent = agent_over(answers, sent, output_type=NativeOutput(Review))
    result = await agent.run("Rate it.")
    assert result.output == Review(stars=4)
    assert sent[0]["response_format"]["type"] == "json_schema"


async def test_streamed_reasoning_content_becomes_a_thinking_part():
    sent: list[dict] = []
    agent = agent_over([stream(["The user ", "asks."], ["Par", "is."])], sent)
    async with agent.run_stream("Capital of France?") as run:
        output = await run.get_output()
    assert output == "Paris."
    response = run.all_messages()[-1]
    assert isinstance(response, ModelResponse)
    thinking = [part.content for part in response.parts if isinstance(part, ThinkingPart)]
    assert thinking == ["The user asks."]
    assert sent[0]["stream"] is True


async def test_thinking_goes_back_to_llama_server_in_reasoning_content():
    # llama-server hands an assistant message's reasoning_content to the chat template
    # (verified with /apply-template), so history keeps the model's thoughts where it wants them.
    sent: list[dict] = []
    agent = agent_over([completion("Paris.", "France."), completion("Lyon.", "Second.")], sent)
    first = await agent.run("Capital of France?")
    await agent.run("Second city?", message_history=first.all_messages())
    assistant = [m for m in sent[1]["messages"] if m["role"] == "assistant"]
    assert assistant == [{"role": "assistant", "content": "Paris.", "reasoning_content": "France."}]


async def test_chat_template_kwargs_reach_the_body_through_pydantic_ais_own_model():
    sent: list[dict] = []
    agent = agent_over([completion("a", ""), completion("b", "")], sent)
    assert type(agent.model) is OpenAIChatModel
    settings = llamacpp_model_settings(
        chat_template_kwargs={"enable_thinking": False}, max_tokens=9, extra_body={"top_k": 5}
    )
    await agent.run("q", model_settings=settings)
    await agent.run("q", model_settings={"extra_body": {"top_k": 5}})
    assert sent[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert sent[0]["top_k"] == 5 and 9 in (
        sent[0].get("max_tokens"),
        sent[0].get("max_completion_tokens"),
    )
    assert "chat_template_kwargs" not in sent[1] and sent[1]["top_k"] == 5


def test_chat_template_kwargs_that_are_not_an_object_are_refused():
    with pytest.raises(ConfigurationError, match="JSON object"):
        llamacpp_model_settings(chat_template_kwargs=["enable_thinking"])


async def test_llamacpp_model_keeps_chat_template_kwargs_through_a_runs_extra_body():
    sent: list[dict] = []
    agent = agent_over([completion("a", ""), completion("b", "")], sent, model_class=LlamaCppModel)
    settings = LlamaCppModelSettings(llamacpp_chat_template_kwargs={"enable_thinking": False})
    await agent.run("q", model_settings=settings)
    await agent.run("q", model_settings={**settings, "extra_body": {"top_k": 5}})
    assert sent[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert sent[1]["chat_template_kwargs"] == {"enable_thinking": False} and sent[1]["top_k"] == 5
    assert "llamacpp_chat_template_kwargs" not in sent[0]
