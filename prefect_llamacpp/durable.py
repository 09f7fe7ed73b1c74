"""pydantic-ai agents on llama-server, durable under Prefect: the way to run an agent in a flow.

pydantic-ai's `PrefectDurability` capability makes each model call (and each tool call) a
Prefect task run whose result is persisted and keyed by its inputs and the flow run: rerun the
flow run after a crash (`prefect flow-run retry`) and the calls that finished are replayed from
their results, not sent to the server again. `llamacpp_durability()` adds what llama-server
needs: a model call that failed for a passing reason (unreachable, loading, overloaded, timed
out) is retried; one the server refused, or whose answer was wrong, is not; and two identical
calls in one run stay two calls, never one answer replayed for both (`AgentRunKey`).

    @flow
    async def triage(tickets: list[str]) -> list[str]:
        model = await create_llamacpp_model_async()
        agent = Agent(model, name="triage", capabilities=[llamacpp_durability()])
        return [(await agent.run(ticket)).output for ticket in tickets]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from pydantic_ai import RunContext
from pydantic_ai.durable_exec.prefect import (
    DEFAULT_PYDANTIC_AI_CACHE_POLICY,
    PrefectDurability,
    TaskConfig,
)
from pydantic_ai.messages import ModelRequest, ModelResponse

from prefect_llamacpp.provider import is_transient_model_error

RETRY_DELAYS_S = (2.0, 10.0, 30.0)


class AgentRunKey(CachePolicy):
    """The agent run a model call belongs to, in the key of its cached result.

    pydantic-ai keys a model call by its inputs and the flow run, leaving out the agent run's
    id, so two identical agent runs in one flow run (the same question twice, a sampled answer
    asked for again) would get one answer, the second replayed from the first. The agent run's
    id under Prefect is the flow run's id and the run's place among the flow's agent runs,
    rebuilt in the same order when the flow run is retried: with it in the key each agent run
    has its own answers, and a retried run still finds those its calls got before the crash."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: Any, **kwargs: Any
    ) -> str | None:
        run_id = _agent_run_id(inputs)
        return None if run_id is None else f"agent-run-{run_id}"


def _agent_run_id(value: Any, depth: int = 0) -> str | None:
    """The `run_id` of the first `RunContext` (or message) among a task's inputs."""
    if isinstance(value, RunContext | ModelRequest | ModelResponse):
        return value.run_id
    if depth < 3 and isinstance(value, dict | list | tuple):
        for item in value.values() if isinstance(value, dict) else value:
            if (found := _agent_run_id(item, depth + 1)) is not None:
                return found
    return None


def llamacpp_task_config(
    retries: int = 3, retry_delay_seconds: Sequence[float] = RETRY_DELAYS_S, **config: Any
) -> TaskConfig:
    """A pydantic-ai `TaskConfig` for model calls to llama-server: `retries` on transient
    faults only, `retry_delay_seconds` apart (one per retry; the last repeats). `config`: any
    other `TaskConfig` field (`timeout_seconds`, `result_storage`, ...)."""
    config.setdefault("cache_policy", DEFAULT_PYDANTIC_AI_CACHE_POLICY + AgentRunKey())
    return TaskConfig(
        retries=retries,
        retry_delay_seconds=list(retry_delay_seconds),
        retry_condition_fn=_retry_when_transient,
        **config,
    )


def llamacpp_durability(*, retries: int = 3, **kwargs: Any) -> PrefectDurability:
    """pydantic-ai's `PrefectDurability` with model calls retried on transient llama-server
    faults (`llamacpp_task_config(retries)`). `kwargs` go to `PrefectDurability` (`name`,
    `tool_task_config`, `event_stream_handler`, ...). Run the agent inside a `@flow`."""
    kwargs.setdefault("model_task_config", llamacpp_task_config(retries))
    return PrefectDurability(**kwargs)


def _retry_when_transient(task: Any, task_run: Any, state: Any) -> bool:
    error = state.data if isinstance(state.data, BaseException) else None
    return error is not None and is_transient_model_error(error)
