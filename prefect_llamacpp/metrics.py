"""Prometheus metrics for a llama.cpp fleet: what the health checks found, what the batches did.

llama-server's own `/metrics` has counters and gauges; what it cannot have is an outside view:
is the server answering (ready, busy, wedged...), how long a one-token canary waits for its
first byte (a histogram, so a latency objective can be set), which servers a batch took out of
rotation. `FleetMetrics` holds those figures and renders them for Prometheus (a custom
collector); the exporter (`prefect_llamacpp.flows.exporter`) fills it from the flows' Prefect
events and serves it, and the flows push their latest figures to a Pushgateway. No Prefect here.

Names follow Prometheus conventions: a `llamacpp_` prefix (llama-server's own are
`llamacpp:`), units in the name, `_total` only on counters. Labels are bounded: a server's
block name, a model id, a state, an error kind, a batch's name; never a URL, a key or a prompt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from prefect_llamacpp.batch.records import ERROR_KINDS
from prefect_llamacpp.status import ServerState

# Canary latency: a one-token answer takes milliseconds on an idle GPU, seconds on a busy CPU.
CANARY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
logger = logging.getLogger(__name__)
STATES: tuple[str, ...] = tuple(str(state) for state in ServerState)
NO_MODEL = ""  # the model label of a server whose model is not known (unreachable, loading)
# What an event may carry is bounded before it becomes a series: a label's length, a count, a
# measure (a poison value must never make /metrics fail or grow without end).
LABEL_CHARS = 120
MAX_COUNT = 2**53  # the largest integer a float (Prometheus's sample value) holds exactly
MAX_MEASURE = 1e9  # seconds or tokens per second; anything above is not a measurement
MAX_SERIES = 2000  # servers, and batch shards, held at once; newer ones beyond are dropped


@dataclass(frozen=True)
class ServerCheck:
    """What one health check found about one server, as the metrics need it."""

    server: str
    state: str
    model: str = NO_MODEL
    at: float = field(default_factory=time.time)  # Unix time of the check
    total_slots: int | None = None
    busy_slots: int | None = None
    ttfb_s: float | None = None
    total_s: float | None = None
    prompt_tokens_per_s: float | None = None
    predicted_tokens_per_s: float | None = None

    @classmethod
    def from_report(cls, server: str, report: Mapping[str, Any], at: float) -> ServerCheck:
        """From the health check's report: the payload of its `llamacpp.server.<state>` event
        (state, model_id, total_slots, busy_slots, latency{...})."""
        latency = report.get("latency")
        latency = latency if isinstance(latency, Mapping) else {}
        state = report.get("state")
        return cls(
            server=label(server),
            state=state if state in STATES else str(ServerState.ERROR),
            model=label(report.get("model_id")),
            at=at,
            total_slots=_count(report.get("total_slots")),
            busy_slots=_count(report.get("busy_slots")),
            ttfb_s=measure(latency.get("ttfb_s")),
            total_s=measure(latency.get("total_s")),
            prompt_tokens_per_s=measure(latency.get("prompt_tokens_per_s")),
            predicted_tokens_per_s=measure(latency.get("predicted_tokens_per_s")),
        )


@dataclass(frozen=True)
class BatchFigures:
    """A batch run's figures at one moment: its progress event's payload, and what is pushed."""

    batch: str  # the batch's name (its output's file name unless given): a bounded label
    shard: str = ""  # "K/N" for one shard of a sharded batch
    lines: int = 0  # input lines
    succeeded: int = 0
    failed: Mapping[str, int] = field(default_factory=dict)  # error kind -> lines
    done_earlier: int = 0  # answered by an earlier run (resumed)
    in_flight: int = 0
    servers_in: int = 0  # in rotation
    servers_out: int = 0  # taken out (down, wrong key) and not back yet
    completion_tokens: int = 0
    completion_tokens_per_s: float = 0.0
    finished: bool = False
    at: float = field(default_factory=time.time)

    def payload(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "shard": self.shard,
            "lines": self.lines,
            "succeeded": self.succeeded,
            "failed": dict(self.failed),
            "done_earlier": self.done_earlier,
            "in_flight": self.in_flight,
            "servers_in": self.servers_in,
            "servers_out": self.servers_out,
            "completion_tokens": self.completion_tokens,
            "completion_tokens_per_s": self.completion_tokens_per_s,
            "finished": self.finished,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], at: float) -> BatchFigures:
        """From a progress event's payload; a field of the wrong type or out of bounds reads
        as nothing (0), never as an error or a series that breaks /metrics."""
        failed = payload.get("failed")

        def count(name: str) -> int:
            return _count(payload.get(name)) or 0

        return cls(
            batch=label(payload.get("batch")) or "batch",
            shard=label(payload.get("shard")),
            lines=count("lines"),
            succeeded=count("succeeded"),
            # Kinds outside the known set are counted as "other": the label set stays bounded.
            failed=_bounded_kinds(failed if isinstance(failed, Mapping) else {}),
            done_earlier=count("done_earlier"),
            in_flight=count("in_flight"),
            servers_in=count("servers_in"),
            servers_out=count("servers_out"),
            completion_tokens=count("completion_tokens"),
            completion_tokens_per_s=measure(payload.get("completion_tokens_per_s")) or 0.0,
            finished=payload.get("finished") is True,
            at=at,
        )


class _Histogram:
    """Cumulative bucket counts for one label set."""

    def __init__(self) -> None:
        self.counts = [0] * (len(CANARY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(CANARY_BUCKETS):
            if value <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip([*CANARY_BUCKETS, math.inf], self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(bound), running))
        return out


class FleetMetrics:
    """The fleet's figures, rendered for Prometheus when collected. Thread-safe: the HTTP
    endpoint collects on its own thread while the owner observes.

    `histograms=False` leaves the cumulative series (latency histograms, check counters) out:
    a Pushgateway keeps what one short run pushed as it was, it does not add runs together, so
    those come from the long-running exporter only.
    """

    def __init__(self, *, histograms: bool = True, forget_after: float | None = None) -> None:
        self.histograms = histograms
        # A long-running exporter forgets a server or batch not heard of for this long (s):
        # launched servers are named by host and port, so names come and go.
        self.forget_after = forget_after
        self._lock = threading.Lock()
        self._servers: dict[str, ServerCheck] = {}
        self._ttfb: dict[tuple[str, str], _Histogram] = {}
        self._total: dict[tuple[str, str], _Histogram] = {}
        self._checks: Counter[tuple[str, str]] = Counter()
        self._batches: dict[tuple[str, str], BatchFigures] = {}
        self._warned_full: set[str] = set()

    def observe_check(self, check: ServerCheck) -> bool:
        """Take one check in; False when it was dropped (MAX_SERIES servers already held)."""
        with self._lock:
            latest = self._servers.get(check.server)
            if latest is None and len(self._servers) >= MAX_SERIES:
                return self._full("servers")
            if latest is None or latest.at <= check.at:  # a late, older one counts, no more
                self._servers[check.server] = check
                if check.model != NO_MODEL:
                    # A new model on the server ends its old models' series (one model per
                    # server at a time, so model churn cannot grow /metrics); a check that
                    # could not see the model (unreachable, loading) changes nothing.
                    self._drop_series(check.server, keep_model=check.model)
            self._checks[(check.server, check.state)] += 1
            current = self._servers[check.server].model
            if current not in (NO_MODEL, check.model):
                return True  # a late check of a model the server no longer serves: state only
            labels = (check.server, check.model)
            if check.ttfb_s is not None:
                self._ttfb.setdefault(labels, _Histogram()).observe(check.ttfb_s)
            if check.total_s is not None:
                self._total.setdefault(labels, _Histogram()).observe(check.total_s)
        return True

    def observe_batch(self, figures: BatchFigures) -> bool:
        """Take a batch's figures in; False when dropped (MAX_SERIES shards already held)."""
        with self._lock:
            key = (figures.batch, figures.shard)
            latest = self._batches.get(key)
            if latest is None and len(self._batches) >= MAX_SERIES:
                return self._full("batch shards")
            if latest is None or latest.at <= figures.at:
                self._batches[key] = figures
        return True

    def _full(self, what: str) -> bool:
        if what not in self._warned_full:
            self._warned_full.add(what)
            logger.warning(
                "%d %s held already: new ones are dropped until old ones are forgotten "
                "(forget_after)",
                MAX_SERIES,
                what,
            )
        return False

    def _drop_series(self, server: str, keep_model: str) -> None:
        for series in (self._ttfb, self._total):
            for labels in [labels for labels in series if labels[0] == server]:
                if labels[1] != keep_model:
                    del series[labels]

    def _forget(self, before: float) -> None:
        gone = {name for name, check in self._servers.items() if check.at < before}
        for name in gone:
            del self._servers[name]
        for series in (self._ttfb, self._total, self._checks):
            for labels in [labels for labels in series if labels[0] in gone]:
                del series[labels]
        for key in [key for key, figures in self._batches.items() if figures.at < before]:
            del self._batches[key]

    def registry(self) -> CollectorRegistry:
        """A registry of these figures alone (not the process's default one)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self.forget_after is not None:
                self._forget(time.time() - self.forget_after)
            servers = list(self._servers.values())
            batches = list(self._batches.values())
            ttfb = {labels: (h.buckets(), h.sum) for labels, h in self._ttfb.items()}
            total = {labels: (h.buckets(), h.sum) for labels, h in self._total.items()}
            checks = dict(self._checks)
        yield from _server_families(servers)
        if self.histograms:
            yield _histogram(
                "llamacpp_canary_first_byte_seconds",
                "Time from sending the one-token canary to its first streamed byte.",
                ttfb,
            )
            yield _histogram(
                "llamacpp_canary_duration_seconds",
                "Time from sending the one-token canary to the end of its answer.",
                total,
            )
            counter = CounterMetricFamily(
                "llamacpp_health_checks",
                "Health checks made, by the state found.",
                labels=["server", "state"],
            )
            for (server, state), count in sorted(checks.items()):
                counter.add_metric([server, state], count)
            yield counter
        yield from _batch_families(batches)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve `/metrics` over HTTP on a thread; returns the port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry())
        return server.server_address[1]

    def push(self, gateway: str, job: str, grouping_key: Mapping[str, str]) -> None:
        """Replace this group's figures at a Pushgateway (`http://host:9091`). Blocks; the
        timeout bounds each socket operation, not the whole push (see `push_within`)."""
        push_to_gateway(
            gateway, job=job, registry=self.registry(), grouping_key=dict(grouping_key), timeout=10
        )

    async def push_within(
        self, seconds: float, gateway: str, job: str, grouping_key: Mapping[str, str]
    ) -> None:
        """`push` given at most `seconds` in all: a gateway that trickles or never answers costs
        a `TimeoutError`, never a hung run. The push runs on a daemon thread, which a process
        may exit without waiting for (the default executor's threads would hold it)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def run() -> None:
            try:
                self.push(gateway, job, grouping_key)
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, exc)
            else:
                loop.call_soon_threadsafe(settle, None)

        threading.Thread(target=run, name="llamacpp-push", daemon=True).start()
        async with asyncio.timeout(seconds):
            await done


def _server_families(servers: Iterable[ServerCheck]) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "llamacpp_server_state",
        "1 for the state the last health check found, 0 for the others.",
        labels=["server", "model", "state"],
    )
    gauges = {
        name: GaugeMetricFamily(name, text, labels=["server", "model"])
        for name, text in (
            ("llamacpp_server_slots", "The server's slots (total_slots in /props)."),
            ("llamacpp_server_slots_busy", "Slots processing a request at the last check."),
            (
                "llamacpp_server_prompt_tokens_per_second",
                "Prompt processing speed (the server's average, from /metrics).",
            ),
            (
                "llamacpp_server_generation_tokens_per_second",
                "Generation speed (the server's average, from /metrics).",
            ),
            ("llamacpp_canary_last_first_byte_seconds", "The last canary's time to first byte."),
            ("llamacpp_canary_last_duration_seconds", "The last canary's total time."),
            ("llamacpp_health_last_check_timestamp_seconds", "When the last check was made."),
        )
    }
    for check in sorted(servers, key=lambda check: check.server):
        labels = [check.server, check.model]
        for name in STATES:
            state.add_metric([*labels, name], 1.0 if check.state == name else 0.0)
        for name, value in (
            ("llamacpp_server_slots", check.total_slots),
            ("llamacpp_server_slots_busy", check.busy_slots),
            ("llamacpp_server_prompt_tokens_per_second", check.prompt_tokens_per_s),
            ("llamacpp_server_generation_tokens_per_second", check.predicted_tokens_per_s),
            ("llamacpp_canary_last_first_byte_seconds", check.ttfb_s),
            ("llamacpp_canary_last_duration_seconds", check.total_s),
            ("llamacpp_health_last_check_timestamp_seconds", check.at),
        ):
            if value is not None:
                gauges[name].add_metric(labels, float(value))
    yield state
    yield from gauges.values()


def _batch_families(batches: Iterable[BatchFigures]) -> Iterator[Metric]:
    lines = GaugeMetricFamily(
        "llamacpp_batch_lines",
        "A batch's input lines by outcome: succeeded, failed, done_earlier (a resumed run's), "
        "pending.",
        labels=["batch", "shard", "outcome"],
    )
    failed = GaugeMetricFamily(
        "llamacpp_batch_failed_lines",
        "A batch's failed lines by error kind.",
        labels=["batch", "shard", "kind"],
    )
    simple = {
        name: GaugeMetricFamily(name, text, labels=["batch", "shard"])
        for name, text in (
            ("llamacpp_batch_requests_in_flight", "Requests sent and not yet answered."),
            ("llamacpp_batch_servers_in_rotation", "Servers taking the batch's requests."),
            ("llamacpp_batch_servers_out_of_rotation", "Servers taken out (down, wrong key)."),
            ("llamacpp_batch_completion_tokens", "Tokens generated for the batch so far."),
            (
                "llamacpp_batch_completion_tokens_per_second",
                "Tokens generated per second of the run.",
            ),
            ("llamacpp_batch_finished", "1 once the run has ended (done or aborted)."),
            ("llamacpp_batch_last_update_timestamp_seconds", "When these figures were taken."),
        )
    }
    for batch in sorted(batches, key=lambda figures: (figures.batch, figures.shard)):
        labels = [batch.batch, batch.shard]
        failed_total = sum(batch.failed.values())
        pending = max(0, batch.lines - batch.succeeded - failed_total - batch.done_earlier)
        for outcome, value in (
            ("succeeded", batch.succeeded),
            ("failed", failed_total),
            ("done_earlier", batch.done_earlier),
            ("pending", pending),
        ):
            lines.add_metric([*labels, outcome], value)
        for kind, count in sorted(batch.failed.items()):
            failed.add_metric([*labels, kind], count)
        for name, value in (
            ("llamacpp_batch_requests_in_flight", batch.in_flight),
            ("llamacpp_batch_servers_in_rotation", batch.servers_in),
            ("llamacpp_batch_servers_out_of_rotation", batch.servers_out),
            ("llamacpp_batch_completion_tokens", batch.completion_tokens),
            ("llamacpp_batch_completion_tokens_per_second", batch.completion_tokens_per_s),
            ("llamacpp_batch_finished", 1.0 if batch.finished else 0.0),
            ("llamacpp_batch_last_update_timestamp_seconds", batch.at),
        ):
            simple[name].add_metric(labels, float(value))
    yield lines
    yield failed
    yield from simple.values()


def _histogram(
    name: str, text: str, series: Mapping[tuple[str, str], tuple[list[tuple[str, float]], float]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, text, labels=["server", "model"])
    for labels, (buckets, total) in sorted(series.items()):
        family.add_metric(list(labels), buckets, total)
    return family


def label(value: Any) -> str:
    """A label value from what an event said: a string, printable, at most LABEL_CHARS long.
    One that had to be changed ends in a short hash of the original, so two names never become
    one series."""
    if not isinstance(value, str):
        return ""
    printable = "".join(char if char.isprintable() else "?" for char in value)
    if printable == value and len(value) <= LABEL_CHARS:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{printable[: LABEL_CHARS - 9]}~{digest}"


def measure(value: Any) -> float | None:
    """A duration or a rate: a finite number from 0 to MAX_MEASURE, else nothing."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if 0 <= number <= MAX_MEASURE else None  # NaN fails both comparisons


def _count(value: Any) -> int | None:
    """A count: an integer (or a whole float) from 0 to MAX_COUNT, else nothing."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return None
    return value


def _bounded_kinds(failed: Mapping[Any, Any]) -> dict[str, int]:
    kinds: Counter[str] = Counter()
    for kind, count in failed.items():
        kinds[kind if kind in ERROR_KINDS else "other"] += _count(count) or 0
    return {kind: min(count, MAX_COUNT) for kind, count in kinds.items()}
