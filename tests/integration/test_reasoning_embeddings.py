"""Reasoning-model settings and embeddings against real llama-servers."""

from __future__ import annotations

import math

import pytest
from pydantic_ai import Agent, Embedder
from pydantic_ai.exceptions import ModelHTTPError

from prefect_llamacpp import (
    LlamaCppModel,
    LlamaCppModelSettings,
    create_llamacpp_embedding_model,
    create_llamacpp_model,
    llamacpp_model_settings,
)
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.exceptions import NotSupportedError
from prefect_llamacpp.request import (
    build_chat_request,
    build_embedding_request,
    read_embedding_answer,
)
from tests.servers import settings_for

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "hi"}]


async def test_chat_template_kwargs_reach_the_chat_template(template_server):
    async with LlamaCppClient(template_server.url) as client:
        plain = await client.apply_template(build_chat_request(HI, model="tiny-echo").body)
        off = await client.apply_template(
            build_chat_request(
                HI,
                model="tiny-echo",
                max_tokens=8,
                chat_template_kwargs={"enable_thinking": False, "greeting": "HELLO"},
            ).body
        )
        on = await client.apply_template(
            build_chat_request(
                HI, model="tiny-echo", chat_template_kwargs={"enable_thinking": True}
            ).body
        )
    assert plain.startswith("[enable_thinking=False]\n<|im_start|>user\nhi")
    assert "[greeting=" not in plain
    assert off.startswith("[enable_thinking=False]\n[greeting=HELLO]\n<|im_start|>user\nhi")
    assert on.startswith("[enable_thinking=True]\n<|im_start|>user\nhi")


@pytest.mark.parametrize("model_class", ["OpenAIChatModel", "LlamaCppModel"])
async def test_an_agent_run_sends_chat_template_kwargs_to_the_template(
    template_server, model_class
):
    # The template adds a line for `greeting`, so the prompt grows by exactly its tokens.
    model = create_llamacpp_model(settings=settings_for(template_server))
    if model_class == "LlamaCppModel":
        model = LlamaCppModel(model.model_name, provider=model._provider)
        greeting = LlamaCppModelSettings(
            max_tokens=4, llamacpp_chat_template_kwargs={"greeting": "HELLO " * 20}
        )
    else:
        greeting = llamacpp_model_settings(
            max_tokens=4, chat_template_kwargs={"greeting": "HELLO " * 20}
        )
    assert type(model).__name__ == model_class
    agent = Agent(model)
    plain = await agent.run("hi", model_settings={"max_tokens": 4})
    greeted = await agent.run("hi", model_settings=greeting)
    assert isinstance(greeted.output, str)
    assert greeted.usage.input_tokens > plain.usage.input_tokens + 20


async def test_embeddings_have_the_models_dimension_one_per_input(embedding_server):
    texts = ["first text", "a second, longer text", "3"]
    async with LlamaCppClient(embedding_server.url) as client:
        n_embd = (await client.list_models())[0]["meta"]["n_embd"]
        await client.check_embeddings()  # the gate passes
        request = build_embedding_request(texts, model="tiny-embed")
        ours = read_embedding_answer(await client.embeddings(request.body), request.count)
        alone = read_embedding_answer(
            await client.embeddings(build_embedding_request(texts[1], model="x").body), 1
        )
    assert n_embd == 64
    assert [len(vector) for vector in ours.vectors] == [n_embd] * 3
    assert ours.prompt_tokens > 0
    # Input order is kept: the second text alone gives the second vector (see embedding_server).
    assert ours.vectors[1] == pytest.approx(alone.vectors[0], abs=1e-5)
    assert ours.vectors[0] != pytest.approx(ours.vectors[1], abs=1e-3)
    # --embd-normalize defaults to euclidean.
    assert math.hypot(*ours.vectors[0]) == pytest.approx(1.0, abs=1e-4)

    model = create_llamacpp_embedding_model(settings=settings_for(embedding_server))
    theirs = await Embedder(model).embed_documents(texts)
    # Both ask for base64 float32; a second computation may differ in the last bits (the
    # server's batch is not the same one), so close, not equal.
    assert len(theirs.embeddings) == 3
    for their, our in zip(theirs.embeddings, ours.vectors, strict=True):
        assert list(their) == pytest.approx(our, abs=1e-5)
    # The same server still answers chat completions.
    agent = Agent(create_llamacpp_model(settings=settings_for(embedding_server)))
    assert isinstance((await agent.run("hi", model_settings={"max_tokens": 2})).output, str)


async def test_a_server_without_embeddings_is_told_before_anything_is_sent(server):
    async with LlamaCppClient(server.url) as client:
        assert await client.supports_embeddings() is False
        with pytest.raises(NotSupportedError, match="start llama-server with --embeddings") as info:
            await client.check_embeddings()
    assert info.value.status_code == 501
    assert info.value.server_message == (
        "This server does not support embeddings. Start it with `--embeddings`"
    )
    model = create_llamacpp_embedding_model(settings=settings_for(server))
    with pytest.raises(ModelHTTPError) as raised:
        await Embedder(model).embed_query("hi")
    assert raised.value.status_code == 501


async def test_embeddings_without_a_pooling_type_are_not_supported_naming_the_flag(
    no_pooling_server,
):
    async with LlamaCppClient(no_pooling_server.url) as client:
        assert await client.supports_embeddings() is False
        with pytest.raises(NotSupportedError, match="--pooling mean") as info:
            await client.check_embeddings()
    assert info.value.status_code == 400
    assert "Pooling type 'none'" in info.value.server_message
