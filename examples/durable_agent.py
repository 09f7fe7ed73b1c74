"""An agent in a Prefect flow, durable: each model call is a task run, and a crashed run that
is retried replays the calls that finished instead of sending them again.

    LLAMACPP_BASE_URL=http://127.0.0.1:8080 python examples/durable_agent.py "Hi" "Bye"
    python examples/durable_agent.py --retry <flow-run-id>   # after a crash, on any machine

A deployed flow is retried with `prefect flow-run retry <id>` (a worker runs it again). For
a run started by hand, `--retry` does what that command does for a local run: Prefect 3.9's
`prefect flow-run retry --entrypoint` does not await an async flow, so it cannot run this one.
"""

from __future__ import annotations

import asyncio
import sys
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow
from prefect.states import Scheduled
from pydantic_ai import Agent

from prefect_llamacpp import create_llamacpp_model_async, llamacpp_durability


@flow(name="llamacpp-durable-agent")
async def durable_agent_flow(questions: list[str], max_tokens: int = 16) -> list[str]:
    """Ask the server in LLAMACPP_* settings each question in turn, one agent run each."""
    model = await create_llamacpp_model_async()
    agent = Agent(model, name="helper", capabilities=[llamacpp_durability()])
    answers = []
    for question in questions:
        result = await agent.run(question, model_settings={"max_tokens": max_tokens})
        answers.append(result.output)
    return answers


async def retry(flow_run_id: UUID) -> list[str]:
    """Run flow run `flow_run_id` again, as itself: its finished model calls are replayed."""
    async with get_client() as client:
        await client.set_flow_run_state(flow_run_id, Scheduled(message="Retried"), force=True)
        flow_run = await client.read_flow_run(flow_run_id)
    return await run_flow(durable_agent_flow, flow_run=flow_run, parameters=flow_run.parameters)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--retry"]:
        print(asyncio.run(retry(UUID(sys.argv[2]))))
    else:
        print(asyncio.run(durable_agent_flow(sys.argv[1:] or ["Say hello."])))
