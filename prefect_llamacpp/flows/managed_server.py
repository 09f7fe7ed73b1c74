"""A long-lived llama-server kept up by a flow run: started from a launch spec, published as a
`llama.cpp Server` block, restarted when wedged or crashed, stopped when the run ends.

    prefect deployment run 'llamacpp-managed-server/llamacpp-managed-server'

Deploy it on the GPU machine's work pool: the run starts the server there, saves the block
`server_block` with the URL other machines reach it by (so the health and batch deployments
use it by name), and watches it with the health flow's own check every
`restart.check_interval` seconds, restarting it within the restart policy (an event for each:
`llamacpp.server.restarting`, `.restarted`, `.gave_up`). Cancel the run (or let `hours` pass) to
stop the server; a worker or process that dies takes the server with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from prefect_llamacpp.flows.launched import LaunchRef, launched_member, resolve_launch
from prefect_llamacpp.server_url import check_host, listens_everywhere, server_url_at


@flow(
    name="llamacpp-managed-server",
    description="Keep a llama-server up on this worker: start it from a launch spec, save a "
    "llama.cpp Server block for it, restart it when wedged or crashed.",
)
async def llamacpp_managed_server_flow(
    launch: LaunchRef,
    server_block: str,
    hours: Annotated[float | None, Field(gt=0)] = None,
    advertise_host: str = "",
) -> None:
    """Start the server `launch` describes and keep it up until the run is cancelled.

    Args:
        launch: The name of a saved llama.cpp Launch block, or a launch spec. Give it a fixed
            `port` (and `host` 0.0.0.0 for other machines) so the saved URL stays the same
            across runs.
        server_block: The llama.cpp Server block to save (overwritten) with the server's URL
            and key, for the health and batch flows.
        hours: Stop the server after this many hours; left out: when the run is cancelled.
        advertise_host: The host name others reach the server by; left out: 127.0.0.1 for a
            server on loopback, else this machine's host name.
    """
    if advertise_host:  # refused before anything starts
        advertise_host = check_host(advertise_host, "advertise_host")
    logger = get_run_logger()
    spec, name = await resolve_launch(launch)
    async with launched_member(spec, name=name) as member:
        block = member.block
        host = advertise_host or _advertised(spec.host)
        reached = server_url_at(host, member.managed.port).openai_base
        block.base_url = reached
        await block.save(server_block, overwrite=True)
        logger.info("Saved block %r -> %s; serving until cancelled", server_block, reached)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), hours * 3600 if hours else None)


def _advertised(host: str) -> str:
    """The host in the saved URL: loopback stays loopback, any address is this machine."""
    return socket.gethostname() if listens_everywhere(host) else host
