"""`llamacpp-exporter`: a long-running Prometheus exporter for the fleet, fed by Prefect events.

The health flow emits `llamacpp.server.<state>` for each check (state, model, slots, canary
latency) and a batch run `llamacpp.batch.progress` as it goes, wherever they run: on any worker,
in any process. The exporter subscribes to those events on the Prefect API and serves what they
say at `/metrics`, with the canary latency as histograms that add up over every check (which a
Pushgateway cannot do for short runs). It sends nothing to the servers itself.

    llamacpp-exporter --port 9464            # PREFECT_API_URL names the Prefect server
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from prefect.events import Event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import CliApp

from prefect_llamacpp.flows.health import EVENT_PREFIX
from prefect_llamacpp.flows.local_api import cli_config, cli_problem
from prefect_llamacpp.flows.telemetry import BATCH_EVENT
from prefect_llamacpp.metrics import STATES, BatchFigures, FleetMetrics, ServerCheck

logger = logging.getLogger("prefect_llamacpp.exporter")
DEFAULT_PORT = 9464
FORGET_AFTER_S = 24 * 3600


def observe(metrics: FleetMetrics, event: Event) -> bool:
    """Take one event into `metrics`; False when it is not one the metrics read."""
    at = event.occurred.timestamp()
    if event.event == BATCH_EVENT:
        metrics.observe_batch(BatchFigures.from_payload(event.payload, at))
        return True
    prefix, _, state = event.event.rpartition(".")
    if prefix != EVENT_PREFIX or state not in STATES:
        return False  # a managed server's restart, say: not a check
    server = event.resource.name or event.resource.id.removeprefix(f"{EVENT_PREFIX}.")
    metrics.observe_check(ServerCheck.from_report(server, {**event.payload, "state": state}, at))
    return True


async def export(
    metrics: FleetMetrics,
    *,
    since: datetime | None = None,
    on_connected: Callable[[], None] | None = None,
) -> None:
    """Feed `metrics` from the Prefect API's event stream until cancelled. Events that occurred
    before `since` (default: now) are not replayed: a restarted exporter starts counting anew,
    as any Prometheus counter does after a restart."""
    if not PREFECT_API_URL.value():
        raise RuntimeError(
            "PREFECT_API_URL is not set: the exporter reads the events of a Prefect server "
            "(export PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    wanted = EventFilter(
        event=EventNameFilter(prefix=[f"{EVENT_PREFIX}.", BATCH_EVENT]),
        occurred=EventOccurredFilter(since=since or datetime.now(UTC)),
    )
    # Reconnects (a Prefect server restart) without end; events seen twice are dropped by id.
    async with get_events_subscriber(filter=wanted, reconnection_attempts=sys.maxsize) as events:
        if on_connected is not None:
            on_connected()
        async for event in events:
            observe(metrics, event)


class ExporterCommand(BaseModel):
    """Serve the llama.cpp fleet's metrics for Prometheus, from the health and batch flows'
    Prefect events (PREFECT_API_URL names the Prefect server)."""

    model_config = cli_config("llamacpp-exporter", {})

    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="Port of /metrics.")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on; 0.0.0.0 for a Prometheus on another machine.",
    )
    forget_after: float = Field(
        FORGET_AFTER_S,
        gt=0,
        description="Seconds after which a server or batch not heard of drops out of /metrics.",
    )


def main(argv: list[str] | None = None) -> int:
    try:
        command = CliApp.run(ExporterCommand, cli_args=sys.argv[1:] if argv is None else argv)
    except (ValidationError, ValueError) as exc:
        print(f"llamacpp-exporter: {cli_problem(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = FleetMetrics(forget_after=command.forget_after)
    try:
        port = metrics.serve(command.port, command.host)
    except OSError as exc:
        print(
            f"llamacpp-exporter: cannot listen on {command.host}:{command.port}: {exc}",
            file=sys.stderr,
        )
        return 2

    def connected() -> None:
        # One line a supervisor (or a test) can wait for.
        print(f"llamacpp-exporter: serving http://{command.host}:{port}/metrics", flush=True)

    try:
        asyncio.run(export(metrics, on_connected=connected))
    except RuntimeError as exc:
        print(f"llamacpp-exporter: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
