"""A pydantic-ai agent durable under Prefect (`llamacpp_durability`) against a real Prefect
server and a real llama-server: its model calls are task runs; the flow's process group
SIGKILLed after the first call finished, the crashed run retried as itself (the example's
`--retry`, what `prefect flow-run retry` does for a local run),
and the first call is replayed from its persisted result, not sent again (counted at a proxy in
front of the server)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.states import Crashed

from harness.prefect_server import prefect_server as start_prefect_server
from harness.prefect_server import talking_to
from tests.stalling_proxy import StallingProxy

# Its own waits add up past the default 300 s on a loaded machine (set-up included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


def wait_for(what: str, check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


async def mark_crashed() -> FlowRun:
    async with get_client() as client:
        (flow_run,) = await client.read_flow_runs()
        assert flow_run.state.is_running()  # killed: nobody could say otherwise
        # What a worker (or Prefect's heartbeat automation) says of a vanished run.
        await client.set_flow_run_state(flow_run.id, Crashed(), force=True)
    return flow_run


async def read_run(flow_run_id: UUID) -> tuple[FlowRun, list[TaskRun]]:
    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    async with get_client() as client:
        (flow_run,) = await client.read_flow_runs(flow_run_filter=this_run)
        return flow_run, await client.read_task_runs(flow_run_filter=this_run)


def test_a_crashed_agent_flow_retried_replays_the_finished_model_call(server, tmp_path):
    with start_prefect_server(tmp_path / "prefect") as prefect:
        env = {
            **os.environ,
            "PREFECT_API_URL": prefect.api,
            "PREFECT_HOME": str(tmp_path / "home"),
            "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        log = tmp_path / "first.log"
        # The first answer goes through; the second is held, so the run is killed between
        # the two model calls with the first one finished.
        with StallingProxy(server.url, mode="hold", hold_after=1) as first_proxy:
            run = subprocess.Popen(
                [sys.executable, "examples/durable_agent.py", "First question.", "Second one."],
                cwd=REPO,
                env={**env, "LLAMACPP_BASE_URL": first_proxy.url},
                stdout=open(log, "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            wait_for("the second model call", lambda: first_proxy.held == 1 or run.poll())
            assert run.poll() is None, log.read_text()[-3000:]
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
            assert first_proxy.completions_forwarded == 1

        with talking_to(prefect.api):
            flow_run = asyncio.run(mark_crashed())

        with StallingProxy(server.url, mode="pass") as rerun_proxy:
            retried = subprocess.run(
                [sys.executable, "examples/durable_agent.py", "--retry", str(flow_run.id)],
                cwd=REPO,
                env={**env, "LLAMACPP_BASE_URL": rerun_proxy.url},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert retried.returncode == 0, retried.stdout[-3000:] + retried.stderr[-3000:]
            # Only the second question reached the server: the first was replayed.
            assert rerun_proxy.completions_forwarded == 1

        with talking_to(prefect.api):
            after, task_runs = asyncio.run(read_run(flow_run.id))
        assert after.state.is_completed(), after.state
        calls = [task.name for task in task_runs if task.name.startswith("Model Request")]
        assert len(calls) >= 2, [task.name for task in task_runs]  # the calls, as task runs
