"""The deep health check as a Prefect task: the state check plus the one-token canary.

`tasks.llamacpp.check_health` sends no completion; this one does, when the server is ready and
awake (never to a sleeping server, never to an unloaded router model). Like `check_health` it
never fails for a server fault and is never retried or cached: the state is the answer.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from src.core.models.base_provider import ProviderHealthStatus
from src.core.models.canary import CanaryOptions
from src.core.models.llamacpp_provider import check_server_health
from tasks.llamacpp import ServerRef, resolve_server


@task(
    name="llama.cpp deep health check",
    description="Report the server's state as the health check does, then send a one-token "
    "completion with first-byte and total deadlines: latency when it answers; busy (slow but "
    "progressing) or wedged (stuck) when it does not. Never fails for a server fault.",
    cache_policy=NO_CACHE,
)
async def check_health_with_canary(
    server: ServerRef = None, canary: CanaryOptions | None = None
) -> ProviderHealthStatus:
    """The server's state with the canary's latency figures; a server fault is reported.

    Args:
        server: A `LlamaCppServer` block, the name of a saved one, or None for the
            `LLAMACPP_*` environment settings.
        canary: The canary's deadlines (first byte, whole answer, progress interval); None
            for the defaults.

    Returns:
        A `ProviderHealthStatus`: `state` ready, busy, wedged, sleeping, loading,
        unauthorized, unreachable or error; `metadata["latency"]` has `ttfb_s`, `total_s` and
        tokens/s when the canary answered.
    """
    block = await resolve_server(server)
    async with block.get_client() as client:
        return await check_server_health(
            client, model_name=block.model_name, canary=canary or CanaryOptions()
        )
