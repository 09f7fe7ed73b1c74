"""An agent durable under Prefect (`llamacpp_durability`): model calls that fail for a passing
reason are retried as task runs, those the server refused are not. The server's answers are
played back (a status on demand); tests/e2e/test_durable_agent.py runs a real server, a crash
and a replay."""

from __future__ import annotations

import httpx2
import pytest
from prefect import flow
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelHTTPError

from prefect_llamacpp import (
    ServerCapabilities,
    create_llamacpp_model,
    is_transient_model_error,
    llamacpp_durability,
    llamacpp_task_config,
)
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.exceptions import ServerHTTPError, ServerUnreachableError

ANSWER = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    "model": "tiny",
    "object": "chat.completion",
    "id": "x",
    "created": 1,
}
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


def agent_answering(statuses: list[int], sent: list[int]) -> Agent:
    """An agent whose server answers with each status in turn, then 200."""

    def reply(request):
        sent.append(1)
        status = statuses[len(sent) - 1] if len(sent) <= len(statuses) else 200
        return httpx2.Response(status, json=ANSWER if status == 200 else LOADING)

    model = create_llamacpp_model(
        "tiny",
        LlamaCppSettings(base_url="http://llama:8080"),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(reply)),
        capabilities=ServerCapabilities(),
    )
    # The OpenAI client's own retries (2) stay on: a task retry starts after they gave up.
    config = llamacpp_task_config(retries=2, retry_delay_seconds=[0])
    return Agent(model, name="asker", capabilities=[llamacpp_durability(model_task_config=config)])


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ServerUnreachableError("refused"), True),
        (ServerHTTPError("x", status_code=503, url="u"), True),
        (ServerHTTPError("x", status_code=500, url="u"), False),
        (ModelHTTPError(503, "m"), True),
        (ModelHTTPError(429, "m"), True),
        (ModelHTTPError(400, "m"), False),
        (ModelHTTPError(500, "m"), False),
        (ValueError("a bug"), False),
    ],
)
def test_which_model_errors_are_transient(error, transient):
    assert is_transient_model_error(error) is transient


async def test_a_model_call_that_met_a_loading_server_is_retried_as_a_task(prefect_harness):
    sent: list[int] = []
    agent = agent_answering([503] * 3, sent)  # the client's three tries, then the task's

    @flow
    async def ask() -> str:
        return (await agent.run("Hi")).output

    assert await ask() == "hi"
    assert len(sent) == 4


async def test_a_refused_model_call_is_not_retried(prefect_harness):
    sent: list[int] = []
    agent = agent_answering([400] * 10, sent)

    @flow
    async def ask() -> str:
        return (await agent.run("Hi")).output

    state = await ask(return_state=True)
    assert state.is_failed() and len(sent) == 1


async def test_the_same_question_twice_in_one_run_is_asked_twice(prefect_harness):
    """pydantic-ai keys a call by its inputs and the flow run: without the call's order in the
    key, the second identical question would be answered from the first call's result."""
    sent: list[int] = []
    agent = agent_answering([], sent)

    @flow
    async def ask_twice() -> list[str]:
        return [(await agent.run("Pick a word.")).output for _ in range(2)]

    assert await ask_twice() == ["hi", "hi"]
    assert len(sent) == 2
