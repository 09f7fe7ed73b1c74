"""pydantic-ai agents on llama-server, durable under Prefect: the way to run an agent in a flow.

pydantic-ai's `PrefectDurability` capability makes each model call (and each tool call) a
Prefect task run whose result is persisted and keyed by its inputs and the flow run: rerun the
flow run after a crash (`prefect flow-run retry`) and the calls that finished are replayed from
their results, not sent to the server again. `llamacpp_durability()` adds what llama-server
needs: a model call that failed for a passing reason (unreachable, loading, overloaded, timed
out) is retried; one the server refused, or whose answer was wrong, is not.

    @flow
    async def triage(tickets: list[str]) -> list[str]:
        model = await create_llamacpp_model_async()
        agent = Agent(model, name="triage", capabilities=[llamacpp_durability()])
        return [(await agent.run(ticket)).output for ticket in tickets]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_ai.durable_exec.prefect import PrefectDurability, TaskConfig

from prefect_llamacpp.provider import is_transient_model_error

RETRY_DELAYS_S = (2.0, 10.0, 30.0)


def llamacpp_task_config(
    retries: int = 3, retry_delay_seconds: Sequence[float] = RETRY_DELAYS_S, **config: Any
) -> TaskConfig:
    """A pydantic-ai `TaskConfig` for model calls to llama-server: `retries` on transient
    faults only, `retry_delay_seconds` apart (one per retry; the last repeats). `config`: any
    other `TaskConfig` field (`timeout_seconds`, `result_storage`, ...)."""
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
