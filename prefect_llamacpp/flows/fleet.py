"""One server or a fleet: resolving the `server` parameter and the readiness gate over several.

`server` on the flows is a block name, a list of names, or None (the `llamacpp` block, else the
`LLAMACPP_*` settings). Every named block must exist: a typo fails the run before anything is
sent. The gate checks every server at once; servers not ready are reported and join the run when they
are ready (`FleetMember.may_join`), unless none is ready, in which case it waits (up to
`ready_timeout`) for the first that is. A server that refuses the key, or a router with no
model to ask for, takes no work in the run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prefect import get_run_logger

from prefect_llamacpp.batch.dispatch import join_problem
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.exceptions import BatchAbortedError, ConfigurationError, LlamaCppError
from prefect_llamacpp.managed import ManagedServer
from prefect_llamacpp.status import ProviderHealthStatus, ServerState
from prefect_llamacpp.tasks import check_server, load_server_or_env, wait_until_ready

ServerNames = str | list[str] | None


@dataclass
class FleetMember:
    label: str
    block: LlamaCppServer
    status: ProviderHealthStatus | None = None
    skipped: str | None = None  # why it takes no work at the start of this run
    # A server this run started on its worker (`launch`): only this run uses it.
    managed: ManagedServer | None = None

    @property
    def may_join(self) -> bool:
        """Skipped now, but may join the run when ready: not for a wrong key, nor for a ready
        server that cannot be used as configured (a router with no model)."""
        if self.skipped is None or self.status is None:
            return self.skipped is not None
        return self.status.state != ServerState.UNAUTHORIZED and not self.status.is_ready


def server_names(server: ServerNames) -> list[str | None]:
    """`server` as a list of names (None: the default). Raises `ValueError` for an empty name, an
    empty list, or a name given twice."""
    names = [server] if server is None or isinstance(server, str) else list(server)
    if not names:
        raise ConfigurationError(
            "server is an empty list: name at least one llama.cpp Server block"
        )
    for name in names:
        if name is not None and not name.strip():
            raise ConfigurationError(
                "server is an empty name: give the name of a llama.cpp Server block, or leave it "
                "out to use the 'llamacpp' block (else the LLAMACPP_* settings)"
            )
    if len(set(names)) != len(names):
        raise ConfigurationError(f"server names a block twice: {names}")
    return names


async def resolve_servers(server: ServerNames) -> list[FleetMember]:
    """The blocks `server` names, each once, in order. Raises for an empty or missing name."""
    names = server_names(server)
    members = []
    for name in names:
        block, label = await load_server_or_env(name)
        members.append(FleetMember(label, block))
    return members


async def gate_fleet(members: list[FleetMember], ready_timeout: float) -> list[FleetMember]:
    """Check every server at once; returns them all, `skipped` saying why one takes no work.
    Raises `BatchAbortedError`, saying why each one is not ready, when none becomes ready within
    `ready_timeout`."""
    logger = get_run_logger()
    await _check_all(members)
    ready = [member for member in members if member.skipped is None]
    if not ready:
        waiting = [
            asyncio.create_task(wait_until_ready(member.block, timeout=ready_timeout))
            for member in members
            if member.status is None or member.status.state.value != "unauthorized"
        ]
        pending = set(waiting)
        while pending:  # until one is ready, or every one has given up
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not task.cancelled() and task.exception() is None for task in done):
                break
        if waiting:
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            await _check_all(members)
            ready = [member for member in members if member.skipped is None]
    if not ready:
        reasons = "; ".join(f"{member.label}: {member.skipped}" for member in members)
        raise BatchAbortedError(f"no llama-server is ready ({reasons}). No prompt was sent.")
    for member in members:
        if member.may_join:
            logger.warning(
                "llama-server %s is not ready (%s); it joins the run when it is",
                member.label,
                member.skipped,
            )
        elif member.skipped:
            logger.warning("Skipping llama-server %s: %s", member.label, member.skipped)
    return members


async def _check_all(members: list[FleetMember]) -> None:
    statuses = await asyncio.gather(
        *(check_server(member.block) for member in members), return_exceptions=True
    )
    for member, status in zip(members, statuses, strict=True):
        if isinstance(status, BaseException):
            if not isinstance(status, LlamaCppError):
                raise status
            member.status, member.skipped = None, str(status)
            continue
        member.status = status
        member.skipped = join_problem(status, member.block.model_name)
