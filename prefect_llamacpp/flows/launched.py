"""Servers a flow run starts itself: the batch flow's `launch` parameter.

`launch` is the name of a saved `llama.cpp Launch` block or a `LaunchSpec`. The run starts the
server on the worker (`prefect_llamacpp.managed`), adds it to its fleet as a server only this run
uses (the capacity broker leaves it out: nobody else can reach it), and stops it when the run
ends. While it runs, the manager's checks emit the health flow's own events
(`llamacpp.server.<state>`), and each restart `llamacpp.server.restarting` / `.restarted`
(or `.gave_up` when the restart budget is spent), so the alert automations see them.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from prefect import get_run_logger
from prefect.events import emit_event
from pydantic import ValidationError

from prefect_llamacpp.blocks import LlamaCppLaunch, LlamaCppServer
from prefect_llamacpp.config import LlamaCppConnection
from prefect_llamacpp.exceptions import BlockNotFoundError, ConfigurationError
from prefect_llamacpp.flows.fleet import FleetMember
from prefect_llamacpp.flows.health import EVENT_PREFIX, emit_health_event, server_resource
from prefect_llamacpp.launch import LaunchSpec
from prefect_llamacpp.managed import ManagedServer, default_check, llamacpp_server
from prefect_llamacpp.status import ProviderHealthStatus

LaunchRef = LaunchSpec | str


async def resolve_launch(launch: LaunchRef) -> tuple[LaunchSpec, str]:
    """The spec and a name for it (the block's, else the model's id). Raises
    `BlockNotFoundError` for a name no block has, naming how to create one."""
    if isinstance(launch, LaunchSpec):
        return launch, launch.model_id
    if not launch or not launch.strip():
        raise ConfigurationError("launch is an empty name: name a llama.cpp Launch block")
    try:
        block = await LlamaCppLaunch.aload(launch)
    except (ValidationError, RuntimeError) as exc:
        raise ConfigurationError(
            f"The llama.cpp Launch block {launch!r} is saved with values that no longer "
            "validate; fix it in the Prefect UI (Blocks) or save it again."
        ) from exc
    except ValueError as exc:
        raise BlockNotFoundError(
            f"No llama.cpp Launch block named {launch!r}. Create one in the Prefect UI (Blocks "
            f"-> llama.cpp Launch) or in Python with LlamaCppLaunch(model=...).save({launch!r}); "
            "register the type first with `prefect block register -m prefect_llamacpp`."
        ) from exc
    return block.spec(), launch


def launch_parameter(launch: LaunchRef) -> Any:
    """`launch` as a parameter of another flow run (a shard's). A spec with a key is refused:
    Prefect stores parameters in the open, so a key travels in a block only."""
    if isinstance(launch, str):
        return launch
    if launch.api_key.get_secret_value():
        raise ConfigurationError(
            "a sharded batch passes its launch spec to every shard as a parameter, which Prefect "
            "stores in plain view: save a spec with an api_key as a llama.cpp Launch block and "
            "pass its name"
        )
    return launch.model_dump(mode="json")


@contextlib.asynccontextmanager
async def launched_member(launch: LaunchRef, name: str | None = None) -> AsyncIterator[FleetMember]:
    """Start the server `launch` describes; yield it as a fleet member; stop it on exit."""
    spec, resolved = await resolve_launch(launch)
    name = name or resolved
    logger = get_run_logger()
    host = socket.gethostname()

    def label(server: ManagedServer) -> str:
        return f"{name}@{host}:{server.port}"

    def on_event(kind: str, server: ManagedServer, detail: dict[str, Any]) -> None:
        if kind in ("restarting", "gave_up"):
            logger.warning("Managed llama-server %s: %s (%s)", label(server), kind, detail)
        emit_event(
            event=f"{EVENT_PREFIX}.{kind}",
            resource=server_resource(label(server), server.base_url),
            payload={"managed": True, **detail},
        )

    async def check(server: ManagedServer) -> ProviderHealthStatus:
        status = await default_check(server)
        emit_health_event(label(server), status, {}, canary_sent=True)
        return status

    logger.info("Starting llama-server %s with %s", name, spec.model)
    async with llamacpp_server(spec, on_event=on_event, check=check) as server:
        settings = server.settings()
        block = LlamaCppServer(
            **{field: getattr(settings, field) for field in LlamaCppConnection.model_fields}
        )
        logger.info(
            "llama-server %s is ready at %s (pid %s)", label(server), server.root, server.pid
        )
        yield FleetMember(label(server), block, managed=server)
