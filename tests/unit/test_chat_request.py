"""The batch hot path builds llama.cpp requests itself: they must be what pydantic-ai sends."""

from __future__ import annotations

import json

import httpx2
import pytest
from pydantic_ai.direct import model_request
from pydantic_ai.messages import (
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    UserPromptPart,
)
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.output import OutputObjectDefinition

from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.provider import LlamaCppModel, LlamaCppProvider
from prefect_llamacpp.request import (
    AnswerError,
    build_chat_request,
    read_chat_answer,
    structured_output,
)

SCHEMA = {"type": "object", "properties": {"stars": {"type": "integer"}}, "required": ["stars"]}
COMPLETION = {
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": '{"stars": 4}'},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    "model": "tiny",
    "object": "chat.completion",
    "id": "x",
    "created": 1,
}


async def pydantic_ai_body(
    messages, schema, max_tokens, temperature, extra_body, chat_template_kwargs=None
) -> dict:
    """What pydantic-ai sends through LlamaCppProvider for the same request."""
    sent = []

    def answer(request):
        sent.append(json.loads(request.content))
        return httpx2.Response(200, json=COMPLETION)

    client = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    provider = LlamaCppProvider(base_url="http://llama:8080/v1", http_client=client)
    model = LlamaCppModel("qwen3-8b", provider=provider)
    settings = {"max_tokens": max_tokens, "extra_body": extra_body}
    if chat_template_kwargs is not None:
        settings["llamacpp_chat_template_kwargs"] = chat_template_kwargs
    if temperature is not None:
        settings["temperature"] = temperature
    parameters = (
        ModelRequestParameters(
            output_mode="native",
            output_object=OutputObjectDefinition(json_schema=schema, name="output"),
            allow_text_output=False,
        )
        if schema
        else ModelRequestParameters()
    )
    await model_request(
        model, messages, model_settings=settings, model_request_parameters=parameters
    )
    return sent[0]


@pytest.mark.parametrize("schema", [None, SCHEMA])
@pytest.mark.parametrize("chat_template_kwargs", [None, {"enable_thinking": False}])
async def test_the_body_is_what_pydantic_ai_sends(schema, chat_template_kwargs):
    ours = json.loads(
        build_chat_request(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"},
            ],
            model="qwen3-8b",
            system_prompt="Be brief.",
            output_schema=schema,
            max_tokens=9,
            temperature=0.5,
            extra_body={"top_k": 20},
            chat_template_kwargs=chat_template_kwargs,
        ).body
    )
    theirs = await pydantic_ai_body(
        [
            ModelRequest(parts=[SystemPromptPart("Be brief.")]),
            ModelRequest(parts=[UserPromptPart("hi")]),
            ModelResponse(parts=[TextPart("yo")]),
            ModelRequest(parts=[UserPromptPart("again")]),
        ],
        schema,
        9,
        0.5,
        {"top_k": 20},
        chat_template_kwargs,
    )
    assert ("chat_template_kwargs" in ours) == (chat_template_kwargs is not None)
    # pydantic-ai names the limit max_completion_tokens; llama-server reads both.
    theirs["max_tokens"] = theirs.pop("max_completion_tokens")
    assert ours == theirs


def test_a_line_with_its_own_system_message_keeps_it():
    body = json.loads(
        build_chat_request(
            [{"role": "developer", "content": "own"}, {"role": "user", "content": "q"}],
            model="m",
            system_prompt="flow-level",
            output_schema=SCHEMA,
        ).body
    )
    roles = [(m["role"], m["content"][:12]) for m in body["messages"]]
    assert roles == [("system", "own"), ("system", "\nAlways resp"), ("user", "q")]


def test_extra_body_cannot_replace_the_request():
    body = json.loads(
        build_chat_request(
            [{"role": "user", "content": "q"}],
            model="m",
            max_tokens=5,
            extra_body={"model": "evil", "messages": [], "max_tokens": 999, "min_p": 0.1},
        ).body
    )
    assert body["model"] == "m" and body["max_tokens"] == 5 and body["min_p"] == 0.1
    assert body["messages"] == [{"role": "user", "content": "q"}]


async def test_chat_template_kwargs_replace_those_in_extra_body_on_both_paths():
    extra = {"top_k": 20, "chat_template_kwargs": {"enable_thinking": True, "other": 1}}
    kwargs = {"enable_thinking": False}
    ours = json.loads(
        build_chat_request(
            [{"role": "user", "content": "q"}],
            model="qwen3-8b",
            max_tokens=3,
            extra_body=extra,
            chat_template_kwargs=kwargs,
        ).body
    )
    theirs = await pydantic_ai_body(
        [ModelRequest(parts=[UserPromptPart("q")])], None, 3, None, extra, kwargs
    )
    theirs["max_tokens"] = theirs.pop("max_completion_tokens")
    assert ours == theirs
    assert ours["chat_template_kwargs"] == kwargs and ours["top_k"] == 20
    assert extra["chat_template_kwargs"] == {"enable_thinking": True, "other": 1}  # not mutated


@pytest.mark.parametrize("bad", ["enable_thinking=false", ["enable_thinking"], {1: True}])
async def test_chat_template_kwargs_that_are_not_an_object_are_refused_on_both_paths(bad):
    # llama-server would ignore them silently, and the user would never know.
    with pytest.raises(ConfigurationError, match="JSON object"):
        build_chat_request([{"role": "user", "content": "q"}], model="m", chat_template_kwargs=bad)
    with pytest.raises(ConfigurationError, match="JSON object"):
        await pydantic_ai_body([ModelRequest(parts=[UserPromptPart("q")])], None, 3, None, {}, bad)


def test_answers_are_read_and_checked_against_the_schema():
    answer = read_chat_answer(COMPLETION)
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens) == ('{"stars": 4}', 7, 3)
    key = json.dumps({**SCHEMA, "properties": {"stars": {"type": "integer", "multipleOf": 2}}})
    assert structured_output(answer, key) == {"stars": 4}
    odd = read_chat_answer({**COMPLETION, "choices": [{"message": {"content": '{"stars": 3}'}}]})
    with pytest.raises(AnswerError, match="at stars: 3 is not a multiple of 2"):
        structured_output(odd, key)
    cut = read_chat_answer(
        {"choices": [{"message": {"content": '{"sta'}, "finish_reason": "length"}]}
    )
    with pytest.raises(AnswerError, match="cut off at max_tokens"):
        structured_output(cut, key)


def test_the_reasoning_is_kept_apart_and_never_parsed():
    body = {
        "choices": [
            {
                "message": {"content": '{"stars": 5}', "reasoning_content": '{"stars": "x"}'},
                "finish_reason": "stop",
            }
        ]
    }
    answer = read_chat_answer(body)
    assert answer.reasoning == '{"stars": "x"}'
    assert structured_output(answer, json.dumps(SCHEMA)) == {"stars": 5}


@pytest.mark.parametrize("body", [{}, {"choices": []}, {"choices": [{"message": None}]}, [], "x"])
def test_a_body_that_is_not_a_chat_completion_is_an_invalid_response(body):
    with pytest.raises(AnswerError) as info:
        read_chat_answer(body)
    assert info.value.kind == "invalid_response"
