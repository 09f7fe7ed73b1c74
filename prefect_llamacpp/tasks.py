"""One Prefect task per question to a llama-server, retried only on transient faults.

Transient: connection refused, timeout, 502/503/504 (including 503 "Loading model"). Never
retried: 401 (wrong key), 404, 501 (endpoint switched off), bad input. Nothing is cached: two
health checks in one flow run must ask the server twice.

Every task takes `server`: a `LlamaCppServer` block, the name of a saved one, or None for the
`LLAMACPP_*` environment settings. Never a raw key.

`check_server` sends no completion; `check_server_with_canary` also sends the one-token canary
when the server is ready and awake (never to a sleeping server, never to an unloaded router
model). Like `check_server` it never fails for a server fault and is never retried or cached:
the state is the answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import ValidationError

from prefect_llamacpp.blocks import DEFAULT_BLOCK_NAME, LlamaCppServer
from prefect_llamacpp.canary import CanaryOptions
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppConnection, LlamaCppSettings
from prefect_llamacpp.exceptions import BlockNotFoundError, LlamaCppError
from prefect_llamacpp.provider import read_server_status
from prefect_llamacpp.status import ProviderHealthStatus

ServerRef = LlamaCppServer | str | None


async def resolve_server(server: ServerRef) -> LlamaCppServer:
    """The block for `server`: itself, a saved block loaded by name, or one built from env.

    Raises `BlockNotFoundError` when no block has that name, and `LlamaCppError` naming the
    fields when the saved block no longer validates. Neither message carries the key.
    """
    if isinstance(server, LlamaCppServer):
        return server
    if server is None:
        settings = LlamaCppSettings()
        return LlamaCppServer(
            **{name: getattr(settings, name) for name in LlamaCppConnection.model_fields}
        )
    try:
        return await LlamaCppServer.aload(server)
    except ValidationError as exc:
        raise _invalid_block(server, exc) from exc
    except RuntimeError as exc:  # Prefect wraps a failed validation in a RuntimeError
        if isinstance(exc.__cause__, ValidationError):
            raise _invalid_block(server, exc.__cause__) from exc
        raise
    except ValueError as exc:
        raise BlockNotFoundError(
            f"No llama.cpp Server block named {server!r}. Create one in the Prefect UI "
            "(Blocks -> llama.cpp Server) or in Python with "
            f"LlamaCppServer(base_url=...).save({server!r}); register the type first with "
            "`prefect block register -m prefect_llamacpp`."
        ) from exc


def _invalid_block(name: str, exc: ValidationError) -> LlamaCppError:
    problems = "; ".join(
        f"{_field_label(error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
        for error in exc.errors(include_input=False, include_url=False)
    )
    return LlamaCppError(
        f"The llama.cpp Server block {name!r} is saved with invalid values ({problems}); "
        "fix them in the Prefect UI (Blocks) or save the block again."
    )


def _field_label(loc: tuple) -> str:
    """The field as the block form shows it, and as Python names it: `Base URL [base_url]`."""
    path = ".".join(str(part) for part in loc)
    field = LlamaCppConnection.model_fields.get(str(loc[0])) if loc else None
    return f"{field.title} [{path}]" if field and field.title else path or "block"


async def load_server_or_env(server: str | None) -> tuple[LlamaCppServer, str]:
    """The block to use and a label for reports.

    A named block must exist (`BlockNotFoundError` otherwise: a typo never falls back to
    another server). With no name, the block saved as `llamacpp` is used if there is one, else
    the `LLAMACPP_*` environment settings, and the run log says so.
    """
    if server:
        return await resolve_server(server), server
    try:
        return await resolve_server(DEFAULT_BLOCK_NAME), DEFAULT_BLOCK_NAME
    except BlockNotFoundError:
        pass
    get_run_logger().info(
        "No server named and no %r block saved; using the LLAMACPP_* environment settings.",
        DEFAULT_BLOCK_NAME,
    )
    return await resolve_server(None), "env"


@asynccontextmanager
async def server_client(server: ServerRef) -> AsyncIterator[LlamaCppClient]:
    """An open client for the block `server` refers to; closed when the block ends."""
    block = await resolve_server(server)
    async with block.get_client() as client:
        yield client


async def retry_on_transient(task, task_run, state) -> bool:
    """Retry condition: only faults that waiting can fix."""
    try:
        await state.aresult()
    except LlamaCppError as exc:
        return exc.transient
    except Exception:
        return False
    return False


RETRY_OPTIONS: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),  # 2, 4, 8 s
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_transient,
    "cache_policy": NO_CACHE,
}


@task(
    name="llama.cpp health check",
    description="Report the server's state (ready, loading, sleeping, unauthorized, unreachable, "
    "error), its model and /props summary. Never fails for a server fault; it reports it.",
    cache_policy=NO_CACHE,
)
async def check_server(server: ServerRef = None) -> ProviderHealthStatus:
    """The server's state, model and `/props` summary; a server fault is reported, not raised.

    Args:
        server: A `LlamaCppServer` block, the name of a saved one, or None for the
            `LLAMACPP_*` environment settings.

    Returns:
        A `ProviderHealthStatus` whose `state` says ready, loading, sleeping, unauthorized,
        unreachable or error, and whose `error` says what to fix.
    """
    block = await resolve_server(server)
    async with block.get_client() as client:
        return await read_server_status(client, model_name=block.model_name)


@task(
    name="llama.cpp detect model",
    description="The id of the model the server serves (first of /v1/models), or None.",
    **RETRY_OPTIONS,
)
async def detect_model(server: ServerRef = None) -> str | None:
    """The id of the model the server serves.

    Args:
        server: A `LlamaCppServer` block, the name of a saved one, or None for the
            `LLAMACPP_*` environment settings.

    Returns:
        The first id `/v1/models` lists, or None when it lists none. Raises a `LlamaCppError`
        (after retries, when transient) when the server cannot answer.
    """
    async with server_client(server) as client:
        return await client.served_model_id()


@task(
    name="llama.cpp props",
    description="GET /props: total_slots, is_sleeping, build_info, per-slot n_ctx. Does not wake "
    "a sleeping server.",
    **RETRY_OPTIONS,
)
async def get_props(server: ServerRef = None, model: str | None = None) -> dict[str, Any]:
    """The server's `/props`; does not wake a sleeping server.

    Args:
        server: A `LlamaCppServer` block, the name of a saved one, or None for the
            `LLAMACPP_*` environment settings.
        model: In router mode, the model to ask about; it is never loaded for this
            (`autoload=false`). None: the server itself.

    Returns:
        `/props` as llama-server sends it: `total_slots`, `is_sleeping`, `build_info`, ...
    """
    async with server_client(server) as client:
        return await client.get_props(model=model)


@task(
    name="llama.cpp slots",
    description="GET /slots: one entry per slot. Wakes a sleeping server and resets its idle "
    "timer; fails with a clear message when the server runs with --no-slots.",
    **RETRY_OPTIONS,
)
async def get_slots(server: ServerRef = None, model: str | None = None) -> list[dict[str, Any]]:
    """The server's `/slots`. Wakes a sleeping server and resets its idle timer.

    Args:
        server: A `LlamaCppServer` block, the name of a saved one, or None for the
            `LLAMACPP_*` environment settings.
        model: In router mode, the model to ask about; it is never loaded for this
            (`autoload=false`). None: the server itself.

    Returns:
        One dict per slot. Raises `NotSupportedError` when the server runs with --no-slots.
    """
    async with server_client(server) as client:
        return await client.get_slots(model=model)


@task(
    name="llama.cpp metrics",
    description="GET /metrics parsed into numbers (needs llama-server --metrics).",
    **RETRY_OPTIONS,
)
async def get_metrics(server: ServerRef = None, model: str | None = None) -> dict[str, float]:
    """The server's Prometheus `/metrics` as numbers.

    Args:
        server: A `LlamaCppServer` block, the name of a saved one, or None for the
            `LLAMACPP_*` environment settings.
        model: In router mode, the model to ask about; it is never loaded for this
            (`autoload=false`). None: the server itself.

    Returns:
        `{"requests_processing": 0.0, ...}`. Raises `NotSupportedError` without --metrics.
    """
    async with server_client(server) as client:
        return await client.get_metrics(model=model)


@task(
    name="llama.cpp wait until ready",
    description="Poll the server through 'connection refused' and 503 'Loading model' until it "
    "is ready; fail at the deadline saying what it was doing, or at once on a wrong key.",
    cache_policy=NO_CACHE,  # the deadline is the retry policy
)
async def wait_until_ready(server: ServerRef = None, timeout: float = 300) -> dict[str, Any]:
    """Wait through "connection refused" and 503 "Loading model" until the server is ready.

    Args:
        server: A `LlamaCppServer` block, the name of a saved one, or None for the
            `LLAMACPP_*` environment settings.
        timeout: Seconds to wait in all before failing, saying what the server was doing.

    Returns:
        The server's `/health` answer once it is ready (`{"status": "ok"}`). Fails at once
        on a wrong or missing key (`UnauthorizedError`).
    """
    async with server_client(server) as client:
        return await client.wait_until_ready(timeout=timeout)


@task(
    name="llama.cpp deep health check",
    description="Report the server's state as the health check does, then send a one-token "
    "completion with first-byte and total deadlines: latency when it answers; busy (slow but "
    "progressing) or wedged (stuck) when it does not. Never fails for a server fault.",
    cache_policy=NO_CACHE,
)
async def check_server_with_canary(
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
        unauthorized, unreachable or error; its `latency` has `ttfb_s`, `total_s` and
        tokens/s when the canary answered.
    """
    block = await resolve_server(server)
    async with block.get_client() as client:
        return await read_server_status(
            client, model_name=block.model_name, canary=canary or CanaryOptions()
        )
