"""What the flows tell Prometheus: their figures pushed to a Pushgateway, and the batch's
progress event that the exporter (`llamacpp-exporter`) turns into metrics, as it does the
health flow's `llamacpp.server.<state>` events.

A push that fails (no gateway there, a timeout) costs a warning, never the run."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable, Iterable

from prefect import get_run_logger
from prefect.events import emit_event
from pydantic import ValidationError

from prefect_llamacpp.config import MetricsSettings, check_pushgateway_url
from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.flows.batch_progress import update_gap
from prefect_llamacpp.metrics import BatchFigures, FleetMetrics, ServerCheck
from prefect_llamacpp.storage import shown

BATCH_EVENT = "llamacpp.batch.progress"
HEALTH_JOB = "llamacpp_health"
BATCH_JOB = "llamacpp_batch"
PUSH_DEADLINE_S = 15.0  # a whole push, however slowly the gateway answers


def pushgateway(given: str | None) -> str | None:
    """The Pushgateway to push to: `given` ("" for none), else `LLAMACPP_PUSHGATEWAY_URL`.
    `ConfigurationError` (one line, naming where the bad address came from) if it is not one."""
    try:
        if given is not None:
            return check_pushgateway_url(given) or None
    except ValueError as exc:
        raise ConfigurationError(f"pushgateway: {exc}") from None
    try:
        return MetricsSettings().pushgateway_url or None
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigurationError(f"LLAMACPP_PUSHGATEWAY_URL: {problem}") from None


async def push(gateway: str, metrics: FleetMetrics, job: str, grouping: dict[str, str]) -> bool:
    """Replace one group at the gateway; False (and a warning) when it could not be done."""
    try:
        await metrics.push_within(PUSH_DEADLINE_S, gateway, job, grouping)
    except Exception as exc:
        get_run_logger().warning(
            "Could not push metrics to the Pushgateway at %s (%s: %s); the run goes on",
            shown(gateway),
            type(exc).__name__,
            exc if not isinstance(exc, TimeoutError) else f"no answer within {PUSH_DEADLINE_S:g} s",
        )
        return False
    return True


async def push_health(gateway: str, checks: Iterable[ServerCheck]) -> None:
    """One group per server (`job="llamacpp_health"`, `server`): a run checking one server
    replaces that server's figures and leaves the others'. Gauges only: a gateway keeps a
    pushed histogram as it was pushed, so latency histograms come from the exporter."""

    async def one(check: ServerCheck) -> bool:
        metrics = FleetMetrics(histograms=False)
        metrics.observe_check(check)
        return await push(gateway, metrics, HEALTH_JOB, {"server": check.server})

    await asyncio.gather(*(one(check) for check in checks))


def batch_resource(figures: BatchFigures) -> dict[str, str]:
    name = f"{figures.batch}#{figures.shard}" if figures.shard else figures.batch
    return {"prefect.resource.id": f"llamacpp.batch.{name}", "prefect.resource.name": name}


class BatchTelemetry:
    """A batch run's figures, sent as the run goes (an event and a push, as often as its
    progress artifact is updated: every 2 s at first, at most 30 s apart) and once at the end."""

    def __init__(self, figures: Callable[[bool], BatchFigures], gateway: str | None) -> None:
        self._figures = figures
        self.gateway = gateway
        self._started = self._last = time.monotonic()
        # (seconds into the run, lines answered): the throughput chart's points
        self._answered: list[tuple[float, int]] = [(0.0, 0)]
        self._pushing: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self._failed_push = False

    def start(self) -> None:
        """Send the figures on time while no result arrives, too (long generations, a server
        down): a quiet run is not taken for a stalled one (LlamaCppBatchStalled)."""
        self._ticker = asyncio.get_running_loop().create_task(self._tick_on_time())

    async def _tick_on_time(self) -> None:
        while True:
            await asyncio.sleep(update_gap(time.monotonic() - self._started))
            try:
                self.tick()
            except Exception as exc:  # figures are never worth the run
                get_run_logger().warning("Batch figures not sent on time: %s", exc)
                return

    def tick(self) -> None:
        """Results arrived: send the figures if it is time."""
        now = time.monotonic()
        if now - self._last >= update_gap(now - self._started):
            self._last = now
            self._send(self._figures(False))

    async def finish(self, finished: bool = True) -> None:
        """The last figures, sent and (the push) waited for."""
        if self._pushing is not None:
            await asyncio.gather(self._pushing, return_exceptions=True)
        figures = self._figures(finished)
        self._send(figures, push_now=False)
        if self.gateway:
            await self._push(figures)

    async def close(self) -> None:
        """Whatever happened: nothing left running. A push in flight is waited for (at most
        PUSH_DEADLINE_S), not cancelled: its thread cannot be stopped, and it should not land
        after the final figures (one that outlives its deadline may)."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._pushing is not None:
            await asyncio.gather(self._pushing, return_exceptions=True)

    def throughput(self, points: int = 40) -> list[float]:
        """Lines answered per second over the run, in `points` equal spans (fewer for a short
        run: one per 2 s at most), from the figures taken so far and now."""
        figures = self._figures(False)
        self._sample(figures)
        elapsed = self._answered[-1][0]
        count = max(1, min(points, int(elapsed // 2)))
        width = max(elapsed, 1e-3) / count
        cumulative = [_answered_at(self._answered, width * index) for index in range(count + 1)]
        return [round((b - a) / width, 2) for a, b in itertools.pairwise(cumulative)]

    def _sample(self, figures: BatchFigures) -> None:
        answered = figures.succeeded + sum(figures.failed.values())
        self._answered.append((time.monotonic() - self._started, answered))

    def _send(self, figures: BatchFigures, push_now: bool = True) -> None:
        self._sample(figures)
        emit_event(event=BATCH_EVENT, resource=batch_resource(figures), payload=figures.payload())
        busy = self._pushing is not None and not self._pushing.done()
        # One push at a time; a gateway that failed once is not asked again until the end.
        if push_now and self.gateway and not busy and not self._failed_push:
            self._pushing = asyncio.get_running_loop().create_task(self._push(figures))

    async def _push(self, figures: BatchFigures) -> None:
        metrics = FleetMetrics()
        metrics.observe_batch(figures)
        grouping = {"batch": figures.batch, **({"shard": figures.shard} if figures.shard else {})}
        if not await push(self.gateway, metrics, BATCH_JOB, grouping):
            self._failed_push = True


def _answered_at(samples: list[tuple[float, int]], at: float) -> float:
    """Lines answered `at` seconds into the run, read off the samples in a straight line."""
    index = bisect.bisect_left(samples, at, key=lambda sample: sample[0])
    if index == 0:
        return samples[0][1]
    if index == len(samples):
        return samples[-1][1]
    (t0, n0), (t1, n1) = samples[index - 1], samples[index]
    return n0 + (n1 - n0) * ((at - t0) / (t1 - t0) if t1 > t0 else 1.0)
