"""The managed-server flow: a long-lived llama-server published as a block; the health flow finds
it wedged (SIGSTOP), its manager restarts it, the health flow finds it ready again; the run's
end stops it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.flows.health import llamacpp_health_flow
from prefect_llamacpp.flows.managed_server import llamacpp_managed_server_flow
from prefect_llamacpp.launch import LaunchSpec
from tests.flows.test_batch_launch import none_left, servers_of
from tests.flows.test_health_flow import events_named

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def until(condition, seconds: float):
    deadline = time.monotonic() + seconds
    while True:
        value = await condition()
        if value:
            return value
        assert time.monotonic() < deadline, "not within the time given"
        await asyncio.sleep(0.2)


async def state_of(block: str) -> str:
    report = await llamacpp_health_flow(
        block, fail_when_not_ready=False, canary={"first_byte_timeout": 2}
    )
    return report.status.state


async def test_a_wedged_managed_server_is_reported_restarted_and_stopped_at_the_end(
    llama_server_bin,
    tiny_model,
    tmp_path,
    registered_block_type,
    asserting_events_worker,
    reset_worker_events,
):
    model = Path(shutil.copy(tiny_model, tmp_path / "managed-tiny.gguf"))
    launch = LaunchSpec(
        binary=str(llama_server_bin),
        model=str(model),
        # It restarts a wedged server after about 15 s: time for the probe below to see it
        # wedged first, whatever a loaded machine makes a health flow run cost.
        restart={"check_interval": 5, "failed_checks": 3, "first_byte_timeout": 1},
    )
    run = asyncio.create_task(llamacpp_managed_server_flow(launch, "managed-it"))

    async def saved():
        try:
            return await LlamaCppServer.aload("managed-it")
        except ValueError:
            assert not run.done(), run
            return None

    block = await until(saved, 60)
    # A probe block on the same URL with a short timeout: the health flow's verdict in a second.
    await LlamaCppServer(base_url=block.base_url, timeout=1).save("managed-probe", overwrite=True)
    assert await state_of("managed-probe") == "ready"

    (first,) = servers_of(model)
    os.kill(first, signal.SIGSTOP)
    assert await state_of("managed-probe") == "wedged"

    async def restarted():
        return servers_of(model) not in ([], [first]) and await state_of("managed-probe") == "ready"

    await until(restarted, 120)
    assert not run.done()
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    assert none_left(model, 15)
    asserting_events_worker.drain()
    kinds = [event.event for event in events_named(asserting_events_worker)]
    assert "llamacpp.server.restarted" in kinds and "llamacpp.server.stopped" in kinds


async def test_an_advertised_host_with_a_port_is_refused_before_anything_starts(tmp_path):
    # A start would fail otherwise (no such binary): the refusal comes first, naming the form.
    launch = LaunchSpec(binary=str(tmp_path / "no-llama-server"), model=str(tmp_path / "m.gguf"))
    with pytest.raises(ConfigurationError, match="advertise_host must be a bare host name"):
        await llamacpp_managed_server_flow(launch, "managed-it", advertise_host="gpu-1:8080")
