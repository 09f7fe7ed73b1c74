"""The scheduled health flow: is the server up, can it answer, how fast, how busy is it.

Each run checks the server, sends a one-token canary completion (unless the server sleeps or,
in router mode, has no model loaded), writes a markdown artifact and emits a Prefect event
named after the state (`llamacpp.server.ready`, `.busy`, `.wedged`, `.unreachable`, ...) with
the server as its resource and the latency figures in its payload, so the automations in
`automations/llamacpp-alerts.yaml` can alert on it. A run fails when the server is not ready;
`busy` (slow but progressing) and `sleeping` count as ready, `wedged` does not.

    llamacpp-health [BLOCK_NAME ...]     # several names: a fleet (here also python -m flows.health)
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import CliApp, CliPositionalArg

from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.canary import CanaryOptions
from prefect_llamacpp.config import check_pushgateway_url
from prefect_llamacpp.exceptions import ConfigurationError, LlamaCppError, ServerNotReadyError
from prefect_llamacpp.flows.capacity import canary_slot
from prefect_llamacpp.flows.fleet import server_names
from prefect_llamacpp.flows.local_api import cli_config, cli_problem, run_cli
from prefect_llamacpp.flows.report import markdown_table, sparkline
from prefect_llamacpp.flows.telemetry import push_health
from prefect_llamacpp.flows.telemetry import pushgateway as pushgateway_for
from prefect_llamacpp.metrics import ServerCheck, measure
from prefect_llamacpp.status import CanaryLatency, ProviderHealthStatus, ServerState
from prefect_llamacpp.tasks import (
    check_server,
    check_server_with_canary,
    get_metrics,
    get_slots,
    load_server_or_env,
)

EVENT_PREFIX = "llamacpp.server"
HISTORY_CHECKS = 24  # checks in the artifacts' first-byte chart (this one included)
# The /metrics samples worth a line in the report.
REPORTED_METRICS = (
    "requests_processing",
    "requests_deferred",
    "prompt_tokens_total",
    "tokens_predicted_total",
    "predicted_tokens_seconds",
    "prompt_tokens_seconds",
)


class HealthCanary(CanaryOptions):
    """The canary: a one-token completion that tells a busy server from a wedged one."""

    model_config = ConfigDict(frozen=True)

    send: bool = Field(
        True,
        description="Send a one-token completion to a ready server to measure latency and tell "
        "a busy server from a wedged one. Never sent to a sleeping server or an unloaded router "
        "model; it counts as activity for --sleep-idle-seconds.",
    )


class ServerHealth(BaseModel):
    """One server's check."""

    server: str  # the block's name (or "env" for the LLAMACPP_* settings)
    status: ProviderHealthStatus
    busy_slots: int | None = None


class HealthReport(BaseModel):
    """What a health run found: a row per server (one, or a fleet's)."""

    servers: list[ServerHealth]

    @property
    def ready(self) -> int:
        """How many servers are ready (busy and sleeping count)."""
        return sum(1 for row in self.servers if row.status.is_ready)

    @property
    def status(self) -> ProviderHealthStatus:
        """The one server's status, for a run that checked one."""
        if len(self.servers) != 1:
            raise ConfigurationError(
                f"this report holds {len(self.servers)} servers; read .servers for each"
            )
        return self.servers[0].status


@flow(
    name="llamacpp-health",
    description="Check a llama.cpp server: state, a one-token canary (latency; busy or wedged), "
    "model, slots and metrics; artifact + event.",
    retries=0,
)
async def llamacpp_health_flow(
    server: str | list[str] | None = None,
    canary: HealthCanary = HealthCanary(),
    read_slots: bool = True,
    fail_when_not_ready: bool = True,
    fail_when_busy: bool = False,
    min_ready: Annotated[int | None, Field(ge=0)] = None,
    pushgateway: str | None = None,
) -> HealthReport:
    """Check the server saved as block `server`, or a fleet.

    Args:
        server: Name of a saved `llama.cpp Server` block (it must exist), or a list of names
            for a fleet: all are checked at once, one event each and one artifact with a row
            per server and fleet totals. Left out: the block saved as `llamacpp`, else the
            `LLAMACPP_*` settings (the run log says which).
        canary: Whether to send the one-token canary, and its deadlines in seconds.
        read_slots: When metrics are off, read /slots for busy/total. /slots resets the
            server's idle timer, so turn this off if the server uses --sleep-idle-seconds.
        fail_when_not_ready: Fail the run when too few servers are ready (busy and sleeping
            count as ready; wedged, loading, unreachable, unauthorized and error do not).
        fail_when_busy: Also fail the run when a server is busy.
        min_ready: For a fleet, how many servers must be ready; default: all of them.
        pushgateway: A Prometheus Pushgateway (http://host:9091) to push each server's figures
            to (one group per server). Left out: LLAMACPP_PUSHGATEWAY_URL, if set; "": none.

    Returns:
        A `HealthReport`: a row per server (`report.status` for a run of one server).
    """
    gateway = pushgateway_for(pushgateway)  # a bad address fails the run before any check
    names = server_names(server)
    members = [await load_server_or_env(name) for name in names]
    options = canary if canary.send else None
    started = datetime.now(UTC)
    checks = await asyncio.gather(
        *(_check_server(block, label, options, read_slots) for block, label in members)
    )
    history = await earlier_first_bytes([label for label, _, _ in checks], before=started)
    charts = {
        label: first_byte_chart(
            [*history.get(label, []), (status.latency or CanaryLatency()).ttfb_s]
        )
        for label, status, _ in checks
    }
    report = HealthReport(
        servers=[
            ServerHealth(server=label, status=status, busy_slots=load.get("busy_slots"))
            for label, status, load in checks
        ]
    )
    if gateway:
        now = time.time()
        await push_health(
            gateway,
            [
                ServerCheck.from_report(
                    label, health_payload(status, load, canary_sent=options is not None), now
                )
                for label, status, load in checks
            ],
        )
    if isinstance(server, list):
        await _fleet_outcome(checks, charts, min_ready, fail_when_not_ready, fail_when_busy)
        return report
    ((label, status, load),) = checks
    await acreate_markdown_artifact(
        markdown=render_report(label, status, load, charts.get(label, "")),
        key=artifact_key(label),
        description=f"llama.cpp server health: {status.state}",
    )
    if fail_when_busy and status.state == ServerState.BUSY:
        raise ServerNotReadyError(
            f"llama-server {label} is busy: {status.error}", last_state=str(status.state)
        )
    if fail_when_not_ready and not status.is_ready:
        raise ServerNotReadyError(
            f"llama-server {label} is {status.state}: {status.error}",
            last_state=str(status.state),
            transient=status.state in (ServerState.LOADING, ServerState.UNREACHABLE),
        )
    return report


async def _check_server(
    block: LlamaCppServer, label: str, canary: CanaryOptions | None, read_slots: bool
) -> tuple[str, ProviderHealthStatus, dict[str, Any]]:
    """One server's check: state (with the canary when given), slot load, a log line, an event."""
    logger = get_run_logger()
    if canary is not None:
        # Runs sharing the server through the broker hold its slots: the canary takes one too.
        root = block.settings().server_url.root
        async with canary_slot(root, canary.first_byte_timeout) as crowded:
            status = await check_server_with_canary(block, canary)
        if crowded and status.canary:
            status.canary += f" ({crowded})"
    else:
        status = await check_server(block)
    healthy = status.state in (ServerState.READY, ServerState.BUSY)
    load = await _slot_load(block, status, read_slots) if healthy else {}
    logger.info(
        "llama-server %s is %s (model %s)%s",
        label,
        status.state,
        status.model_id or "-",
        f": {status.error}" if status.error else "",
    )
    emit_health_event(label, status, load, canary_sent=canary is not None)
    return label, status, load


def server_resource(label: str, base_url: str) -> dict[str, str]:
    """The Prefect event resource for one server: every event about it names it this way."""
    return {
        "prefect.resource.id": f"{EVENT_PREFIX}.{label}",
        "prefect.resource.name": label,
        "llamacpp.base_url": base_url,
    }


def health_payload(
    status: ProviderHealthStatus, load: dict[str, Any], *, canary_sent: bool
) -> dict[str, Any]:
    """What a check found, as its event carries it (and the metrics read it)."""
    return {
        "state": str(status.state),
        "model_id": status.model_id,
        "error": status.error,
        "total_slots": status.total_slots,
        **{key: value for key, value in load.items() if key in ("busy_slots",)},
        # Every event carries every latency key, None when not measured: alerts rely on it.
        "latency": (status.latency or CanaryLatency()).model_dump(),
        "canary": canary_note(status, canary_sent),
    }


def emit_health_event(
    label: str, status: ProviderHealthStatus, load: dict[str, Any], *, canary_sent: bool
) -> None:
    """The `llamacpp.server.<state>` event the alert automations (and the exporter) read."""
    emit_event(
        event=f"{EVENT_PREFIX}.{status.state}",
        resource=server_resource(label, status.base_url),
        payload=health_payload(status, load, canary_sent=canary_sent),
    )


async def _fleet_outcome(
    checks: list[tuple[str, ProviderHealthStatus, dict[str, Any]]],
    charts: dict[str, str],
    min_ready: int | None,
    fail_when_not_ready: bool,
    fail_when_busy: bool,
) -> None:
    """One artifact for the fleet (a row per server, then totals); fail below `min_ready`."""
    ready = [label for label, status, _ in checks if status.is_ready]
    busy = [label for label, status, _ in checks if status.state == ServerState.BUSY]
    not_ready = {label: status for label, status, _ in checks if not status.is_ready}
    await acreate_markdown_artifact(
        markdown=render_fleet_report(checks, charts),
        key="llamacpp-health-fleet",
        description=f"llama.cpp fleet health: {len(ready)} of {len(checks)} ready",
    )
    wanted = len(checks) if min_ready is None else min_ready
    if fail_when_busy and busy:
        raise ServerNotReadyError(f"llama-servers busy: {', '.join(busy)}", last_state="busy")
    if fail_when_not_ready and len(ready) < wanted:
        problems = "; ".join(
            f"{label} is {status.state}: {status.error}" for label, status in not_ready.items()
        )
        raise ServerNotReadyError(
            f"{len(ready)} of {len(checks)} llama-servers ready (at least {wanted} wanted): "
            f"{problems}",
            last_state="not enough ready",
        )


def render_fleet_report(
    checks: list[tuple[str, ProviderHealthStatus, dict[str, Any]]],
    charts: dict[str, str] | None = None,
) -> str:
    charts = charts or {}
    header = (
        "| Server | State | Model | Slots busy / total | Canary first byte | "
        f"First byte, last {HISTORY_CHECKS} checks | Problem |"
    )
    lines = ["# llama.cpp fleet", "", header, "|---|---|---|---|---|---|---|"]
    total_slots = busy_slots = 0
    for label, status, load in checks:
        slots = status.total_slots
        busy = load.get("busy_slots")
        total_slots += slots or 0
        busy_slots += busy or 0
        latency = status.latency or CanaryLatency()
        problem = (status.error or "-").replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {label} | **{status.state}** | {status.model_id or '-'} | "
            f"{busy if busy is not None else '?'} / {slots or '?'} | "
            f"{_seconds(latency.ttfb_s)} | {charts.get(label) or '-'} | {problem} |"
        )
    ready = sum(1 for _, status, _ in checks if status.is_ready)
    lines.append(
        f"| **fleet** | **{ready} of {len(checks)} ready** | | {busy_slots} / {total_slots} | | | |"
    )
    return "\n".join(lines) + "\n"


async def _slot_load(
    block: LlamaCppServer, status: ProviderHealthStatus, read_slots: bool
) -> dict[str, Any]:
    """Busy slots and key metrics, from /metrics when enabled (no side effects), else /slots."""
    logger = get_run_logger()
    load: dict[str, Any] = {}
    try:
        if status.endpoint_metrics:
            metrics = await get_metrics(block)
            load["metrics"] = {k: metrics[k] for k in REPORTED_METRICS if k in metrics}
            load["busy_slots"] = int(metrics.get("requests_processing", 0))
        elif read_slots and status.endpoint_slots is not False:
            slots = await get_slots(block)
            load["busy_slots"] = sum(
                1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing")
            )
    except (LlamaCppError, TypeError, ValueError, OverflowError) as exc:
        # The state is the answer; a missing (or unreadable: NaN) detail is a warning.
        logger.warning("Could not read slot load: %s", exc)
        load.pop("busy_slots", None)
    return load


def render_report(
    label: str, status: ProviderHealthStatus, load: dict[str, Any], chart: str = ""
) -> str:
    total = status.total_slots
    busy = load.get("busy_slots")
    rows = [
        ("State", f"**{status.state}**"),
        ("Server", status.base_url),
        ("Model", status.model_id or "-"),
        ("Build", status.build_info or "-"),
        ("Slots busy / total", f"{busy if busy is not None else '?'} / {total or '?'}"),
        ("Context per slot (n_ctx)", status.n_ctx or "-"),
        ("Server /health status", status.server_status or "-"),
        ("Chat template can", status.capabilities.summary() if status.capabilities else "-"),
    ]
    if status.role == "router":
        rows.append(
            ("Router models", ", ".join(f"{k}: {v}" for k, v in status.router_models.items()))
        )
    latency = status.latency
    if latency is not None:
        rows += [
            ("Canary", canary_note(status, True)),
            ("Canary time to first byte", _seconds(latency.ttfb_s)),
            *([(f"First byte, last {HISTORY_CHECKS} checks", chart)] if chart else []),
            ("Canary total", _seconds(latency.total_s)),
            ("Prompt tokens/s (server average)", _rate(latency.prompt_tokens_per_s)),
            ("Generation tokens/s (server average)", _rate(latency.predicted_tokens_per_s)),
        ]
        if status.progress:
            rows.append(("Progress while the canary waited", status.progress))
        if status.structured_output:
            rows.append(("JSON schema canary", status.structured_output))
    if status.error:
        rows.append(("Problem", status.error))
    for name, value in (load.get("metrics") or {}).items():
        rows.append((f"metrics: {name}", f"{value:g}"))
    return markdown_table(f"llama.cpp server `{label}`", rows)


async def earlier_first_bytes(labels: list[str], before: datetime) -> dict[str, list[float | None]]:
    """Each server's canary first byte in its last checks before this run (oldest first), read
    from its `llamacpp.server.<state>` events: the history lives where the events do, on the
    Prefect API, whichever worker ran the check. Nothing (no chart) if they cannot be read."""

    async def one(client, label: str) -> tuple[str, list[float | None]]:
        page = await client.read_events(
            filter=EventFilter(
                event=EventNameFilter(prefix=[f"{EVENT_PREFIX}."]),
                resource=EventResourceFilter(id=[f"{EVENT_PREFIX}.{label}"]),
                occurred=EventOccurredFilter(since=before - timedelta(days=7), until=before),
                order=EventOrder.DESC,
            ),
            limit=HISTORY_CHECKS - 1,
        )
        values = []
        for event in reversed(page.events):
            latency = event.payload.get("latency")
            # Whatever an event says (anyone can post one): a bounded number or a gap.
            values.append(measure(latency.get("ttfb_s")) if isinstance(latency, dict) else None)
        return label, values

    try:
        async with get_client() as client:
            return dict(await asyncio.gather(*(one(client, label) for label in labels)))
    except Exception as exc:
        get_run_logger().debug("No first-byte history (events not read: %s)", exc)
        return {}


def first_byte_chart(values: list[float | None]) -> str:
    """`▁▂█▃` 12-840 ms: the first byte over the checks, oldest first; "" with nothing to draw
    (or nothing drawable: a chart never fails a check)."""
    values = [measure(value) for value in values]
    known = [value for value in values if value is not None]
    if len(values) < 2 or not known:
        return ""
    return f"`{sparkline(values)}` {_seconds(min(known))} to {_seconds(max(known))}"


def canary_note(status: ProviderHealthStatus, canary: bool) -> str:
    """What happened to the canary, in a few words."""
    if not canary:
        return "not sent: turned off"
    return status.canary or f"not sent: the server is {status.state}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def artifact_key(label: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-") or "server"
    return f"llamacpp-health-{slug}"


# The canary options the command line names without their group (--first-byte-timeout).
CANARY_FLAGS = ("first_byte_timeout", "total_timeout", "progress_interval", "structured_output")


class HealthCommand(BaseModel):
    """Check llama.cpp servers once (state, canary, latency); exit 1 unless ready. One block
    name checks one server, several a fleet; none: the block 'llamacpp', else the LLAMACPP_*
    settings."""

    model_config = cli_config("llamacpp-health", {f"canary.{name}": name for name in CANARY_FLAGS})

    server: CliPositionalArg[list[str]] = Field(
        default_factory=list, description="llama.cpp Server block names"
    )
    canary: HealthCanary = HealthCanary()
    read_slots: bool = Field(True, description="When metrics are off, read /slots for busy/total.")
    fail_when_busy: bool = Field(False, description="Also exit 1 when a server is busy.")
    min_ready: int | None = Field(
        None, ge=0, description="For a fleet, how many servers must be ready; default: all."
    )
    pushgateway: str | None = Field(
        None,
        description="Push each server's figures to this Prometheus Pushgateway "
        "(http://host:9091); default: LLAMACPP_PUSHGATEWAY_URL, if set.",
    )

    @field_validator("pushgateway")
    @classmethod
    def _valid_gateway(cls, value: str | None) -> str | None:
        # Refused here, before a flow run stores it as a parameter (a password included).
        return None if value is None else check_pushgateway_url(value)

    def flow_parameters(self) -> dict[str, Any]:
        names = self.server
        return {
            "server": names if len(names) > 1 else (names[0] if names else None),
            **self.model_dump(exclude={"server"}),
            "canary": self.canary,
        }


def main(argv: list[str] | None = None) -> int:
    try:
        command = CliApp.run(HealthCommand, cli_args=sys.argv[1:] if argv is None else argv)
    except (ValidationError, ValueError) as exc:
        print(f"llamacpp-health: {cli_problem(exc)}", file=sys.stderr)
        return 2

    def check() -> int:
        final = asyncio.run(llamacpp_health_flow(**command.flow_parameters(), return_state=True))
        return 0 if final.is_completed() else 1

    return run_cli(check)


if __name__ == "__main__":
    sys.exit(main())
