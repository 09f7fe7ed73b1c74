"""The scheduled health flow: is the server up, what is it serving, how busy is it.

Each run writes a markdown artifact and emits a Prefect event named after the state
(`llamacpp.server.ready`, `llamacpp.server.unreachable`, ...) with the server as its resource,
so a Prefect automation can alert on anything but `ready`. A run fails when the server is not
ready, unless `fail_when_not_ready=False`.

    python -m flows.health [BLOCK_NAME]
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.events import emit_event

from blocks.llamacpp import DEFAULT_BLOCK_NAME, LlamaCppServer
from flows.report import markdown_table
from src.core.models.base_provider import ProviderHealthStatus, ServerState
from src.core.utils.exceptions import LlamaCppError
from tasks.llamacpp import check_health, get_metrics, get_slots, load_server_or_env

EVENT_PREFIX = "llamacpp.server"
# The /metrics samples worth a line in the report.
REPORTED_METRICS = (
    "requests_processing",
    "requests_deferred",
    "prompt_tokens_total",
    "tokens_predicted_total",
    "predicted_tokens_seconds",
    "prompt_tokens_seconds",
)


class ServerNotReadyFlowError(LlamaCppError):
    """The health flow found the server in a state other than ready (or sleeping)."""


@flow(
    name="llamacpp-health",
    description="Check a llama.cpp server: state, model, slots and metrics; artifact + event.",
    retries=0,
)
async def llamacpp_health_flow(
    server: str = DEFAULT_BLOCK_NAME,
    fail_when_not_ready: bool = True,
    read_slots: bool = True,
) -> ProviderHealthStatus:
    """Check the server saved as block `server` (or the env settings when there is no such block).

    `read_slots`: when metrics are off, read /slots for busy/total. /slots resets the server's
    idle timer, so turn this off if the server uses --sleep-idle-seconds.
    """
    logger = get_run_logger()
    block, label = await load_server_or_env(server)
    status = await check_health(block)
    load = await _slot_load(block, status, read_slots) if status.state == ServerState.READY else {}
    logger.info(
        "llama-server %s is %s (model %s)%s",
        label,
        status.state,
        status.model_id or "-",
        f": {status.error}" if status.error else "",
    )
    await acreate_markdown_artifact(
        markdown=render_report(label, status, load),
        key=artifact_key(label),
        description=f"llama.cpp server health: {status.state}",
    )
    emit_event(
        event=f"{EVENT_PREFIX}.{status.state}",
        resource={
            "prefect.resource.id": f"{EVENT_PREFIX}.{label}",
            "prefect.resource.name": label,
            "llamacpp.base_url": status.base_url,
        },
        payload={
            "state": str(status.state),
            "model_id": status.model_id,
            "error": status.error,
            "total_slots": status.metadata.get("total_slots"),
            **{key: value for key, value in load.items() if key in ("busy_slots",)},
        },
    )
    if fail_when_not_ready and not status.is_ready:
        raise ServerNotReadyFlowError(f"llama-server {label} is {status.state}: {status.error}")
    return status


async def _slot_load(
    block: LlamaCppServer, status: ProviderHealthStatus, read_slots: bool
) -> dict[str, Any]:
    """Busy slots and key metrics, from /metrics when enabled (no side effects), else /slots."""
    logger = get_run_logger()
    load: dict[str, Any] = {}
    try:
        if status.metadata.get("endpoint_metrics"):
            metrics = await get_metrics(block)
            load["metrics"] = {k: metrics[k] for k in REPORTED_METRICS if k in metrics}
            load["busy_slots"] = int(metrics.get("requests_processing", 0))
        elif read_slots and status.metadata.get("endpoint_slots", True):
            slots = await get_slots(block)
            load["busy_slots"] = sum(1 for slot in slots if slot.get("is_processing"))
    except LlamaCppError as exc:
        # The state is the answer; a missing detail is a warning, not a failed check.
        logger.warning("Could not read slot load: %s", exc)
    return load


def render_report(label: str, status: ProviderHealthStatus, load: dict[str, Any]) -> str:
    meta = status.metadata
    total = meta.get("total_slots")
    busy = load.get("busy_slots")
    rows = [
        ("State", f"**{status.state}**"),
        ("Server", status.base_url),
        ("Model", status.model_id or "-"),
        ("Build", meta.get("build_info", "-")),
        ("Slots busy / total", f"{busy if busy is not None else '?'} / {total or '?'}"),
        ("Context per slot (n_ctx)", meta.get("n_ctx", "-")),
        ("Server /health status", meta.get("status", "-")),
    ]
    if meta.get("role") == "router":
        rows.append(
            ("Router models", ", ".join(f"{k}: {v}" for k, v in meta["router_models"].items()))
        )
    if status.error:
        rows.append(("Problem", status.error))
    for name, value in (load.get("metrics") or {}).items():
        rows.append((f"metrics: {name}", f"{value:g}"))
    return markdown_table(f"llama.cpp server `{label}`", rows)


def artifact_key(label: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-") or "server"
    return f"llamacpp-health-{slug}"


if __name__ == "__main__":
    final = asyncio.run(
        llamacpp_health_flow(
            sys.argv[1] if len(sys.argv) > 1 else DEFAULT_BLOCK_NAME, return_state=True
        )
    )
    sys.exit(0 if final.is_completed() else 1)
