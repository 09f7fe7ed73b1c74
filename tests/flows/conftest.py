"""Prefect's own test harness (a temporary local API and database) for every flow/block test."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from prefect.testing.fixtures import asserting_events_worker, reset_worker_events  # noqa: F401
from prefect.testing.utilities import prefect_test_harness

from harness.prefect_server import drain_events
from prefect_llamacpp.blocks import LlamaCppServer


@pytest.fixture(autouse=True, scope="session")
def prefect_harness():
    drain_events()  # an events worker bound to an earlier test's server would outlive it
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def registered_block_type(prefect_harness):
    LlamaCppServer.register_type_and_schema()


async def flow_run_record(flow_run_id) -> dict:
    """Everything Prefect stored about a flow run, as text: run, parameters, logs, artifacts."""
    await APILogHandler.aflush()
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        artifacts = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {
        "run": run,
        "logs": "\n".join(log.message for log in logs),
        "artifacts": artifacts,
        "text": run.model_dump_json()
        + "\n".join(log.message for log in logs)
        + "\n".join(str(a.data) for a in artifacts),
    }


__all__ = ["ArtifactFilter", "ArtifactFilterFlowRunId", "flow_run_record"]
