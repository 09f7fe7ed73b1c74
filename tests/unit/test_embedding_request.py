"""Embedding requests are built and read in one place, and are what pydantic-ai sends."""

from __future__ import annotations

import array
import base64
import json

import httpx
import httpx2
import pytest
import respx
from pydantic_ai import Embedder
from pydantic_ai.embeddings.openai import OpenAIEmbeddingModel

from prefect_llamacpp import create_llamacpp_embedding_model
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.exceptions import (
    ConfigurationError,
    NotSupportedError,
    ServerHTTPError,
    ServerUnreachableError,
)
from prefect_llamacpp.request import (
    AnswerError,
    build_embedding_request,
    read_embedding_answer,
)
from tests.unit.fakes import ROOT

# What llama-server (b1-0c1e570) answers without --embeddings, and with it but no pooling type.
NO_EMBEDDINGS = {
    "error": {
        "code": 501,
        "message": "This server does not support embeddings. Start it with `--embeddings`",
        "type": "not_supported_error",
    }
}
NO_POOLING = {
    "error": {
        "code": 400,
        "message": "Pooling type 'none' is not OAI compatible. Please use a different pooling type",
        "type": "invalid_request_error",
    }
}


def b64(vector: list[float]) -> str:
    return base64.b64encode(array.array("f", vector).tobytes()).decode()


def embeddings_answer(vectors: list, order: list[int] | None = None) -> dict:
    order = order if order is not None else list(range(len(vectors)))
    return {
        "model": "bge",
        "object": "list",
        "usage": {"prompt_tokens": 11, "total_tokens": 11},
        "data": [{"embedding": vectors[i], "index": i, "object": "embedding"} for i in order],
    }


async def pydantic_ai_embedding_body(inputs, extra_body=None) -> tuple[dict, list]:
    """What pydantic-ai's embedding model sends over LlamaCppProvider, and the vectors it got."""
    sent = []

    def answer(request):
        sent.append(json.loads(request.content))
        count = len(sent[0]["input"])
        vectors = [b64([0.5 * i, -1.0, 2.0]) for i in range(count)]
        return httpx2.Response(200, json=embeddings_answer(vectors))

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    model = create_llamacpp_embedding_model(
        "bge", LlamaCppSettings(base_url="http://llama:8080"), http_client=http
    )
    settings = {"extra_body": extra_body} if extra_body else None
    result = await Embedder(model).embed_documents(inputs, settings=settings)
    return sent[0], result.embeddings


@pytest.mark.parametrize("inputs", ["one text", ["first", "second", "third"]])
@pytest.mark.parametrize("extra_body", [None, {"embd_normalize": -1}])
async def test_the_body_is_what_pydantic_ai_sends(inputs, extra_body):
    request = build_embedding_request(inputs, model="bge", extra_body=extra_body)
    theirs, vectors = await pydantic_ai_embedding_body(inputs, extra_body)
    assert json.loads(request.body) == theirs
    assert request.count == len(theirs["input"])
    # And what pydantic-ai makes of the answer is what we read from it.
    count = request.count
    body = embeddings_answer([b64([0.5 * i, -1.0, 2.0]) for i in range(count)])
    assert read_embedding_answer(body, count).vectors == vectors


def test_model_needs_no_server_and_uses_the_openai_base():
    model = create_llamacpp_embedding_model(settings=LlamaCppSettings(base_url="http://gpu-1:8080"))
    assert isinstance(model, OpenAIEmbeddingModel)
    assert model.model_name == "llamacpp"  # single-model servers answer any name
    assert model.system == "llamacpp"
    assert model.base_url.rstrip("/") == "http://gpu-1:8080/v1"


def test_model_refuses_a_bad_url_naming_the_fix():
    with pytest.raises(ConfigurationError, match="http://localhost:8080"):
        create_llamacpp_embedding_model(settings=LlamaCppSettings.model_construct(base_url="x"))


@pytest.mark.parametrize("inputs", [[], [1, 2], ["ok", None]])
def test_inputs_must_be_texts(inputs):
    with pytest.raises(ValueError, match="input"):
        build_embedding_request(inputs, model="m")


def test_extra_body_cannot_replace_model_or_input():
    request = build_embedding_request(
        ["a"], model="m", extra_body={"model": "evil", "input": [], "encoding_format": "float"}
    )
    assert json.loads(request.body) == {"model": "m", "input": ["a"], "encoding_format": "float"}


def test_vectors_are_read_in_input_order_as_numbers_or_base64():
    answer = read_embedding_answer(
        embeddings_answer([[1, 0.5], b64([2.0, 0.25]), [3.0, 4.0]], order=[2, 0, 1]), 3
    )
    assert answer.vectors == [[1.0, 0.5], [2.0, 0.25], [3.0, 4.0]]
    assert (answer.model, answer.prompt_tokens) == ("bge", 11)


@pytest.mark.parametrize(
    "body",
    [
        {},
        [],
        {"data": None},
        {"data": [{"embedding": [1.0]}]},  # no index
        {"data": [{"embedding": [1.0], "index": 0}, {"embedding": [1.0], "index": 0}]},
        {"data": [{"embedding": [1.0], "index": True}]},
        {"data": [{"embedding": ["1.0"], "index": 0}]},
        {"data": [{"embedding": [True], "index": 0}]},
        {"data": [{"embedding": [], "index": 0}]},
        {"data": [{"embedding": [float("nan")], "index": 0}]},
        {"data": [{"embedding": [1.0, float("inf"), float("-inf")], "index": 0}]},
        {"data": [{"embedding": base64.b64encode(b"\x00\x00\xc0\x7f").decode(), "index": 0}]},
        {"data": [{"embedding": "not base64!", "index": 0}]},
        {"data": [{"embedding": base64.b64encode(b"abc").decode(), "index": 0}]},
        {"data": [{"embedding": None, "index": 0}]},
    ],
)
def test_a_body_that_is_not_one_embeddings_list_is_an_invalid_response(body):
    with pytest.raises(AnswerError) as info:
        read_embedding_answer(body, 1)
    assert info.value.kind == "invalid_response"


def test_large_finite_numbers_are_a_vector_though_their_sum_is_not():
    body = {"data": [{"embedding": [1e308, 1e308], "index": 0}]}
    assert read_embedding_answer(body, 1).vectors == [[1e308, 1e308]]


@pytest.mark.parametrize(
    ("vectors", "count", "match"),
    [
        ([[1.0], [2.0]], 3, "not one for each of the 3 inputs"),
        ([[1.0], [2.0]], 1, "not one for each of the 1 inputs"),
        ([[1.0], [2.0, 3.0]], 2, "differ in length"),
    ],
)
def test_the_vectors_must_match_the_inputs(vectors, count, match):
    with pytest.raises(AnswerError, match=match):
        read_embedding_answer(embeddings_answer(vectors), count)


@respx.mock
async def test_client_posts_the_body_as_built():
    route = respx.post(f"{ROOT}/v1/embeddings").respond(json=embeddings_answer([[1.0, 2.0]]))
    request = build_embedding_request("hi", model="bge")
    async with LlamaCppClient(ROOT, timeout=2) as client:
        answer = read_embedding_answer(await client.embeddings(request.body), request.count)
    assert route.calls.last.request.content == request.body
    assert answer.vectors == [[1.0, 2.0]]


@respx.mock
@pytest.mark.parametrize(
    ("status", "body", "fix"),
    [(501, NO_EMBEDDINGS, "start llama-server with --embeddings"), (400, NO_POOLING, "--pooling")],
)
async def test_a_server_without_embeddings_is_not_supported_naming_the_flag(status, body, fix):
    respx.post(f"{ROOT}/v1/embeddings").respond(status, json=body)
    async with LlamaCppClient(ROOT, timeout=2) as client:
        with pytest.raises(NotSupportedError, match=fix) as info:
            await client.embeddings(build_embedding_request("hi", model="m").body)
        assert info.value.status_code == status and not info.value.transient
        assert info.value.server_message == body["error"]["message"]
        with pytest.raises(NotSupportedError, match=fix):
            await client.check_embeddings()
        assert await client.supports_embeddings() is False


@respx.mock
async def test_other_400s_stay_what_they_are():
    respx.post(f"{ROOT}/v1/embeddings").respond(
        400, json={"error": {"code": 400, "message": '"input" must not be empty'}}
    )
    async with LlamaCppClient(ROOT, timeout=2) as client:
        with pytest.raises(ServerHTTPError) as info:
            await client.embeddings(b'{"input": []}')
    assert not isinstance(info.value, NotSupportedError)


@respx.mock
async def test_the_gate_sends_one_tiny_request_and_says_yes():
    route = respx.post(f"{ROOT}/v1/embeddings").respond(json=embeddings_answer([[1.0]]))
    async with LlamaCppClient(ROOT, timeout=2) as client:
        assert await client.supports_embeddings("bge") is True
    assert json.loads(route.calls.last.request.content) == {"input": ["ping"], "model": "bge"}
    assert route.call_count == 1


@respx.mock
async def test_the_gate_raises_when_it_cannot_ask():
    respx.post(f"{ROOT}/v1/embeddings").mock(side_effect=httpx.ConnectError("refused"))
    async with LlamaCppClient(ROOT, timeout=2) as client:
        with pytest.raises(ServerUnreachableError, match="cannot reach"):
            await client.supports_embeddings()
