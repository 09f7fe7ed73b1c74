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
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlsplit
from uuid import UUID

from prefect.events import Event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import CliApp

from prefect_llamacpp.flows.health import EVENT_PREFIX
from prefect_llamacpp.flows.local_api import cli_config, cli_problem
from prefect_llamacpp.flows.telemetry import BATCH_EVENT
from prefect_llamacpp.metrics import STATES, BatchFigures, FleetMetrics, ServerCheck
from prefect_llamacpp.storage import shown

logger = logging.getLogger("prefect_llamacpp.exporter")
DEFAULT_PORT = 9464
FORGET_AFTER_S = 24 * 3600
SEEN_EVENTS = 10_000  # ids remembered to drop a reconnect's repeated events
CLOCK_SKEW_S = 300.0  # an event dated further ahead than this is dropped, not clamped
MAX_PAUSE_S = 30.0


def observe(metrics: FleetMetrics, event: Event) -> bool:
    """Take one event into `metrics`; False when it is not one the metrics read (or there is
    no room left for a new series). A payload's odd values read as nothing (see metrics.py)."""
    occurred, now = event.occurred.timestamp(), time.time()
    if occurred > now + CLOCK_SKEW_S:
        return False  # dated ahead of any clock skew: forged or broken, never a check to trust
    at = min(occurred, now)  # a clock a little ahead must not pin a server's state
    if event.event == BATCH_EVENT:
        return metrics.observe_batch(BatchFigures.from_payload(event.payload, at))
    prefix, _, state = event.event.rpartition(".")
    if prefix != EVENT_PREFIX or state not in STATES:
        return False  # a managed server's restart, say: not a check
    server = event.resource.name or event.resource.id.removeprefix(f"{EVENT_PREFIX}.")
    check = ServerCheck.from_report(server, {**event.payload, "state": state}, at)
    return metrics.observe_check(check)


def check_api_url(url: str | None) -> str:
    """PREFECT_API_URL if it can be connected to; RuntimeError naming the fix if not."""
    example = "export PREFECT_API_URL=http://127.0.0.1:4200/api"
    if not url:
        raise RuntimeError(
            f"PREFECT_API_URL is not set: the exporter reads the events of a Prefect server "
            f"({example})"
        )
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, or out of range
        valid = False
    if not valid or any(char.isspace() or not char.isprintable() for char in url):
        raise RuntimeError(f"PREFECT_API_URL is not an http(s) URL: {shown(url)!r} ({example})")
    return url


async def export(metrics: FleetMetrics, *, on_connected: Callable[[], None] | None = None) -> None:
    """Feed `metrics` from the Prefect API's event stream until cancelled.

    Events from before the process started are not taken in (the exporter before it counted
    them), so a restarted exporter counts anew, as any Prometheus counter does after a
    restart; a reconnect's replay of the minute before it fills the gap, each event once. A Prefect API that is down (at start or later) is waited for, retried
    with a growing pause; an event seen twice (a reconnect's backfill) counts once; an event
    the metrics cannot read is logged and skipped."""
    url = check_api_url(PREFECT_API_URL.value())
    wanted = EventFilter(event=EventNameFilter(prefix=[f"{EVENT_PREFIX}.", BATCH_EVENT]))
    seen: OrderedDict[UUID, None] = OrderedDict()
    # The subscriber replays the minute before it connects: what happened before this
    # process started was counted by the one before it, if by anyone.
    started = time.time()
    pause = 1.0
    while True:
        try:
            # No reconnecting inside Prefect's subscriber (it would resume from the latest
            # event's time, which a forged date can put in the future): a new one each time.
            async with get_events_subscriber(filter=wanted, reconnection_attempts=0) as events:
                logger.info("Reading llama.cpp events from %s", shown(url))
                if on_connected is not None:
                    on_connected()
                    on_connected = None
                async for event in events:
                    pause = 1.0  # reading again: the next fault is waited for briefly
                    if event.id in seen or event.occurred.timestamp() < started:
                        continue
                    seen[event.id] = None
                    if len(seen) > SEEN_EVENTS:
                        seen.popitem(last=False)
                    _observe_logged(metrics, event)
        except Exception as exc:  # a down or restarting API: wait, never die
            # Also an event Prefect's client cannot parse (a number beyond a double): each
            # reconnect replays the last minute, so it is waited out as the pause grows.
            logger.warning(
                "The Prefect event stream at %s failed (%s: %s); trying again in %.0f s",
                shown(url),
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                pause,
            )
        else:
            logger.warning("The Prefect event stream at %s ended; reconnecting", shown(url))
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_PAUSE_S)


def _observe_logged(metrics: FleetMetrics, event: Event) -> None:
    try:
        observe(metrics, event)
    except Exception as exc:
        logger.warning(
            "Event %s (%s) skipped: %s: %s", event.id, event.event, type(exc).__name__, exc
        )


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
    try:
        check_api_url(PREFECT_API_URL.value())
    except RuntimeError as exc:
        print(f"llamacpp-exporter: {exc}", file=sys.stderr)
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
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
