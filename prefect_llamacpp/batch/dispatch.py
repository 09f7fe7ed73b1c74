"""Slots over a fleet: which llama-server runs the next request.

Each server is a `Lane` with its own HTTP pool and at most `capacity` requests in flight
(`total_slots` plus a small queue depth). A request takes a free slot of the least loaded lane
that serves its model; when none is free it waits in one FIFO and the next slot freed on an
eligible lane is handed to it, so work follows capacity without a central plan and a faster or
larger server simply does more.

A crash suspect (`alone=True`) runs on a lane with nothing else in flight: while it waits, no
new request starts on the lanes it could use, so they drain to it; other lanes go on working.
A lane that goes down stops taking work until the runner's watcher sees it ready again; one
retired (wrong key) never comes back. A lane that was not ready when the run started is
`pending`: down from the start, watched the same way, and shaped from its health report
(`Lane.shape`) when it joins. A waiter whose lanes have all been down for
`ready_timeout` gets `NoServerError` (no polling: one timer per outage).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import DEFAULT_MODEL_NAME, LlamaCppSettings
from prefect_llamacpp.exceptions import NoServerError
from prefect_llamacpp.status import ProviderHealthStatus

# What a server that does not report total_slots is given (llama-server's default -np).
DEFAULT_TOTAL_SLOTS = 4


@dataclass
class LaneStats:
    succeeded: int = 0
    failed: int = 0
    completion_tokens: int = 0
    taken_out: int = 0
    rejoined: int = 0
    joined_late: bool = False  # not ready at the start, joined when it was


@dataclass(eq=False)
class Lane:
    """One llama-server of the fleet."""

    name: str
    settings: LlamaCppSettings
    model: str
    capacity: int
    served_models: frozenset[str] = frozenset()
    request_timeout: float = 600
    client: LlamaCppClient = field(init=False)
    gate: LlamaCppClient = field(init=False)
    stats: LaneStats = field(default_factory=LaneStats)
    embeddings: bool = False  # serves /v1/embeddings (the gate asked it)
    up: bool = True
    retired: bool = False  # out for good (wrong key): never watched back
    down_since: float = 0.0
    epoch: int = 0
    in_flight: int = 0
    solo: bool = False  # a crash suspect has it to itself
    pending: bool = False  # not ready at the start: joins when ready, shaped then
    limits: tuple[int | None, int] = (None, 1)  # (concurrency, queue depth) for `shape`
    # Slots the capacity broker holds for this run on the server (None: no broker): a run
    # sharing the server with others keeps at most this many in flight.
    granted: int | None = None
    total_slots: int = DEFAULT_TOTAL_SLOTS  # the server's, from its health report
    _unused_clients: list[LlamaCppClient] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        root = self.settings.server_url.root
        key = self.settings.api_key
        self.client = self._request_client()
        self.gate = LlamaCppClient(root, timeout=self.settings.timeout, api_key=key)
        if self.pending:
            self.up = False
            self.down_since = time.monotonic()

    @classmethod
    def for_server(
        cls,
        name: str,
        settings: LlamaCppSettings,
        status: ProviderHealthStatus | None,
        *,
        concurrency: int | None,
        queue_depth: int,
        request_timeout: float,
    ) -> Lane:
        """A lane for a server; with no `status` (not ready yet) a pending one, shaped when it
        joins."""
        lane = cls(
            name,
            settings,
            settings.model_name or DEFAULT_MODEL_NAME,
            1,
            request_timeout=request_timeout,
            pending=status is None,
            limits=(concurrency, queue_depth),
        )
        if status is not None:
            lane.shape(status)
        return lane

    def shape(self, status: ProviderHealthStatus) -> None:
        """Model, names served and capacity from the server's health report: at most
        `concurrency` (if set) or `total_slots + queue_depth` requests in flight."""
        concurrency, queue_depth = self.limits
        slots = self.total_slots = status.total_slots or DEFAULT_TOTAL_SLOTS
        capacity = min(concurrency, slots + queue_depth) if concurrency else slots + queue_depth
        self.model = self.settings.model_name or status.model_id or DEFAULT_MODEL_NAME
        self.served_models = frozenset({*status.models, *status.model_aliases})
        if capacity != self.capacity:
            unused = self.client  # no request has gone through it: its pool is empty
            self.capacity = capacity
            self.client = self._request_client()
            self._unused_clients.append(unused)

    def _request_client(self) -> LlamaCppClient:
        return LlamaCppClient(
            self.settings.server_url.root,
            timeout=self.request_timeout,
            api_key=self.settings.api_key,
            max_connections=self.capacity,
            connect_timeout=10,
        )

    def serves(self, model: str | Route | None) -> bool:
        route = _route(model)
        if self.pending:
            return True  # what it serves is known when it joins; until then lines may wait for it
        if route.embeddings and not self.embeddings:
            return False
        return route.model is None or route.model in (self.model, *self.served_models)

    @property
    def allowed(self) -> int:
        """Most requests in flight now: the capacity, or fewer when the broker granted fewer."""
        return self.capacity if self.granted is None else min(self.capacity, self.granted)

    @property
    def has_room(self) -> bool:
        return self.up and not self.solo and self.in_flight < self.allowed

    async def aclose(self) -> None:
        for client in (*self._unused_clients, self.client, self.gate):
            await client.aclose()


def join_problem(status: ProviderHealthStatus, model_name: str | None) -> str | None:
    """Why a server with this health report cannot take work now, or None when it can."""
    if not status.is_ready:
        return f"{status.state}: {status.error}"
    if status.role == "router" and not (model_name or status.model_id):
        return "router mode with no model loaded: set model_name on the block"
    return None


@dataclass(frozen=True)
class Route:
    """What a request needs of a server: a model (None: any) and, for embeddings, the
    `/v1/embeddings` endpoint."""

    model: str | None = None
    embeddings: bool = False

    def __str__(self) -> str:
        what = f"model {self.model!r}" if self.model is not None else "any model"
        return f"{what} with embeddings" if self.embeddings else what


ANY = Route()


def _route(model: str | Route | None) -> Route:
    return model if isinstance(model, Route) else Route(model)


@dataclass(eq=False)
class _Waiter:
    model: Route
    alone: bool
    future: asyncio.Future
    queued: bool = True


class Dispatcher:
    """Hands out lane slots; `take` / `give` around every request."""

    def __init__(self, lanes: list[Lane], ready_timeout: float) -> None:
        self.lanes = lanes
        self.ready_timeout = ready_timeout
        self._waiters: deque[_Waiter] = deque()
        self._alone_waiting: list[_Waiter] = []
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return sum(lane.in_flight for lane in self.lanes)

    def serves(self, model: str | Route | None) -> bool:
        """Some lane not retired serves `model` (a model name or a `Route`)."""
        return any(lane.serves(model) and not lane.retired for lane in self.lanes)

    async def take(self, model: str | Route | None, *, alone: bool = False) -> Lane:
        """A lane with a slot for a request (`alone`: a lane with nothing else in flight).

        Raises `NoServerError` once every lane that serves `model` has been down for
        `ready_timeout`.
        """
        model = _route(model)
        lane = self._pick(model, alone)
        if lane is not None:
            self._enter(lane, alone)
            return lane
        self._raise_if_expired(model)
        waiter = _Waiter(model, alone, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        if alone:
            self._alone_waiting.append(waiter)
        try:
            return await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                if waiter.future.exception() is None:
                    self.give(waiter.future.result(), alone=alone)  # handed over as we left
            raise
        finally:
            self._drop(waiter)

    def give(self, lane: Lane, *, alone: bool = False) -> None:
        """Return a slot taken with `take`."""
        lane.in_flight -= 1
        if alone:
            lane.solo = False
        self._hand_out()

    def regrant(self, lane: Lane, granted: int | None) -> None:
        """The broker's grant for `lane` changed: more room is handed to waiters at once; less
        stops new requests there until those in flight are within it."""
        lane.granted = granted
        self._hand_out()

    def lane_down(self, lane: Lane, *, retire: bool = False) -> bool:
        """Take `lane` out (True if it was up); `retire`: for good."""
        lane.retired = lane.retired or retire
        if retire:
            self._drop_unserved()
        if not lane.up:
            self._expire()  # a retired lane may leave some waiters with nothing to wait for
            return False
        lane.up = False
        lane.down_since = time.monotonic()
        lane.stats.taken_out += 1
        self._arm_timer()
        self._expire()
        return True

    def lane_up(self, lane: Lane) -> None:
        if lane.up or lane.retired:
            return
        lane.up = True
        lane.epoch += 1
        if lane.pending:
            lane.pending = False
            lane.stats.joined_late = True
        else:
            lane.stats.rejoined += 1
        self._hand_out()
        self._drop_unserved()  # lines that waited for a late server that does not serve them
        self._arm_timer()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    # -- plumbing ------------------------------------------------------------------------------

    def _pick(self, model: Route, alone: bool) -> Lane | None:
        best = None
        for lane in self.lanes:
            if not lane.up or not lane.serves(model):
                continue
            if alone:
                if lane.in_flight == 0 and not lane.solo and lane.allowed > 0:
                    return lane
            elif (
                lane.has_room
                and not self._reserved(lane)
                and (best is None or lane.in_flight * best.allowed < best.in_flight * lane.allowed)
            ):
                best = lane
        return best

    def _reserved(self, lane: Lane) -> bool:
        """A suspect waits for this lane to drain: nothing new starts there."""
        return any(lane.serves(waiter.model) for waiter in self._alone_waiting)

    def _enter(self, lane: Lane, alone: bool) -> None:
        lane.in_flight += 1
        if alone:
            lane.solo = True

    def _hand_out(self) -> None:
        """Give free slots to waiters, oldest first, each to a lane that serves its model."""
        index = 0
        while index < len(self._waiters) and any(lane.has_room for lane in self.lanes):
            waiter = self._waiters[index]
            if waiter.future.done():  # cancelled as it waited: it leaves through take()
                self._unqueue(waiter, index)
                continue
            lane = self._pick(waiter.model, waiter.alone)
            if lane is None:
                if waiter.model == ANY and not waiter.alone and not self._alone_waiting:
                    return  # no slot for a request that fits anywhere: none for the rest either
                index += 1
                continue
            self._unqueue(waiter, index)
            self._enter(lane, waiter.alone)
            waiter.future.set_result(lane)
            if waiter.alone:
                index = 0  # the lanes it held back are open again: look from the start

    def _unqueue(self, waiter: _Waiter, index: int | None = None) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        if index is not None:
            del self._waiters[index]
        else:
            self._waiters.remove(waiter)
        if waiter.alone:
            self._alone_waiting.remove(waiter)

    def _drop(self, waiter: _Waiter) -> None:
        """A waiter that left (cancelled, failed): the lanes it held back are open again."""
        if waiter.queued:
            self._unqueue(waiter)
            if waiter.alone:
                self._hand_out()

    # -- outages -------------------------------------------------------------------------------

    def _down_for(self, model: Route) -> float | None:
        """How long every lane serving `model` has been unusable, or None if one is usable."""
        lanes = [lane for lane in self.lanes if lane.serves(model)]
        if any(lane.up for lane in lanes):
            return None
        if not lanes or all(lane.retired for lane in lanes):
            return float("inf")
        return time.monotonic() - max(lane.down_since for lane in lanes)

    def _raise_if_expired(self, model: Route) -> None:
        error = self._expired_error(model)
        if error is not None:
            raise error

    def _expired_error(self, model: Route) -> NoServerError | None:
        down_for = self._down_for(model)
        if down_for is None or down_for < self.ready_timeout:
            return None
        whole = self._down_for(ANY)
        whole_fleet = whole is not None and whole >= self.ready_timeout
        names = ", ".join(lane.name for lane in self.lanes if lane.serves(model))
        if whole_fleet:
            what = (
                f"llama-server {names} was not usable"
                if len(self.lanes) == 1
                else f"no llama-server of the fleet was usable ({names})"
            )
        else:
            what = f"no llama-server serving {model} was usable ({names})"
        return NoServerError(
            f"{what} for {self.ready_timeout:g} s: it stopped answering or refused the key. "
            "Every finished result is saved; rerun the batch to do the rest.",
            whole_fleet=whole_fleet,
        )

    def _drop_unserved(self) -> None:
        """Fail the waiters that no lane serves any more (`NoServerError.unserved`)."""
        for waiter in list(self._waiters):
            if not waiter.future.done() and not self.serves(waiter.model):
                self._unqueue(waiter)
                waiter.future.set_exception(
                    NoServerError(
                        f"no server serves {waiter.model}", whole_fleet=False, unserved=True
                    )
                )

    def _expire(self) -> None:
        """Fail the waiters whose lanes have all been down for `ready_timeout`."""
        for waiter in list(self._waiters):
            error = self._expired_error(waiter.model)
            if error is not None and not waiter.future.done():
                self._unqueue(waiter)
                waiter.future.set_exception(error)
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        down = [lane for lane in self.lanes if not lane.up and not lane.retired]
        if not down:
            return
        # The next outage to reach ready_timeout; past that, look again each second for
        # waiters that come later (one timer, not one per waiter).
        now = time.monotonic()
        dues = [lane.down_since + self.ready_timeout - now for lane in down]
        ahead = [due for due in dues if due > 0]
        delay = min(ahead) + 0.01 if ahead else 1.0
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)
