"""Task retries: transient faults are retried, the others are not (respx counts the calls)."""

from __future__ import annotations

import httpx
import pytest
import respx
from prefect import flow

from prefect_llamacpp import tasks
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.exceptions import (
    NotSupportedError,
    ServerLoadingError,
    ServerUnreachableError,
    UnauthorizedError,
)
from tests.unit.fakes import LOADING, PROPS, ROOT, UNAUTHORIZED, ready_server

BLOCK = LlamaCppServer(base_url=ROOT, timeout=2)


@pytest.fixture
def llama():
    """respx for the fake llama-server only; Prefect's own API calls pass through."""
    with respx.mock(assert_all_called=False) as router:
        router.route(host="127.0.0.1").pass_through()
        yield router


def fast(task):
    """The task as configured, minus the backoff wait (the condition and count are what we test)."""
    return task.with_options(retry_delay_seconds=0, retry_jitter_factor=None)


def test_retry_policy_is_exponential_with_jitter():
    for task in (tasks.get_props, tasks.get_slots, tasks.get_metrics, tasks.detect_model):
        assert task.retries == 3
        assert task.retry_delay_seconds == [2, 4, 8]
        assert task.retry_jitter_factor == 0.5
        assert task.retry_condition_fn is tasks.retry_on_transient
        assert task.name.startswith("llama.cpp ") and task.description


async def test_503_loading_is_retried_until_it_answers(llama):
    route = llama.get(f"{ROOT}/props").mock(
        side_effect=[LOADING, LOADING, httpx.Response(200, json=PROPS)]
    )

    @flow
    async def probe():
        return await fast(tasks.get_props)(BLOCK)

    assert (await probe())["total_slots"] == 4
    assert route.call_count == 3


async def test_transient_faults_give_up_after_the_retries(llama):
    route = llama.get(f"{ROOT}/slots").mock(side_effect=httpx.ConnectError("refused"))

    @flow
    async def probe():
        return await fast(tasks.get_slots)(BLOCK)

    with pytest.raises(ServerUnreachableError):
        await probe()
    assert route.call_count == 4  # one try + three retries


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (UNAUTHORIZED, UnauthorizedError),
        (httpx.Response(501, json={"error": {"message": "no metrics"}}), NotSupportedError),
        (httpx.Response(404, json={"error": {"message": "File Not Found"}}), Exception),
    ],
)
async def test_permanent_faults_are_not_retried(llama, response, error):
    route = llama.get(f"{ROOT}/metrics").mock(return_value=response)

    @flow
    async def probe():
        return await fast(tasks.get_metrics)(BLOCK)

    with pytest.raises(error):
        await probe()
    assert route.call_count == 1


async def test_health_is_not_cached_within_a_flow_run(llama):
    ready_server(llama)
    health = llama.routes[1]

    @flow
    async def twice():
        first = await tasks.check_server(BLOCK)
        second = await tasks.check_server(BLOCK)
        return first, second

    first, second = await twice()
    assert first.state == second.state == "ready"
    assert health.call_count == 2


async def test_wait_until_ready_task_waits_through_loading(llama):
    route = llama.get(f"{ROOT}/health").mock(
        side_effect=[LOADING, httpx.ConnectError("x"), httpx.Response(200, json={"status": "ok"})]
    )
    assert await tasks.wait_until_ready.fn(BLOCK, timeout=10) == {"status": "ok"}
    assert route.call_count == 3


async def test_unknown_block_name_says_how_to_create_one(registered_block_type):
    with pytest.raises(tasks.BlockNotFoundError, match="Create one in the Prefect UI"):
        await tasks.resolve_server("no-such-block")


async def test_no_server_means_env_settings(monkeypatch):
    monkeypatch.setenv("LLAMACPP_BASE_URL", "http://from-env:7/v1")
    block = await tasks.resolve_server(None)
    assert block.base_url == "http://from-env:7/v1"


async def test_loading_error_is_transient():
    assert ServerLoadingError("x", status_code=503, url="u").transient


def every_task():
    from prefect.tasks import Task

    found = [
        value
        for value in vars(tasks).values()
        if isinstance(value, Task) and value.fn.__module__ == tasks.__name__
    ]
    assert len(found) >= 7
    return found


@pytest.mark.parametrize("task", every_task(), ids=lambda task: task.name)
def test_every_task_documents_each_parameter_as_prefect_reads_it(task):
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(task.fn)
    assert schema.properties, task.name
    for name, field in schema.properties.items():
        # Prefect turns a Google `Args:` section into these descriptions (run forms, docs).
        assert field.get("description", "").strip(), f"{task.name}: {name} has no description"
    assert "Returns:" in task.fn.__doc__, task.name


@pytest.mark.parametrize(
    "flow_path", ["flows.batch:llamacpp_batch_flow", "flows.health:llamacpp_health_flow"]
)
def test_every_flow_documents_each_parameter_as_the_run_form_shows_it(flow_path):
    import importlib

    module, name = flow_path.split(":")
    flow = getattr(importlib.import_module(module), name)
    for parameter, field in flow.parameters.properties.items():
        assert field.get("description", "").strip(), f"{flow.name}: {parameter} has no description"
