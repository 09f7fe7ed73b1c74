"""Slots over a fleet: which llama-server runs the next request.

Each server is a `Lane` with its own HTTP pool and at most `capacity` requests in flight
(`total_slots` plus a small queue depth). A request takes a free slot of the least loaded lane
that serves its model; when none is free it waits in one FIFO and the next slot freed on an
eligible lane is handed to it, so work follows capacity without a central plan and a faster or
larger server simply does more. A lane that goes down stops taking work until its watcher sees it
ready again. A crash suspect takes a lane to itself (waits until nothing else is in flight there).

With every lane down for `ready_timeout`, `take` raises `BatchAbortedError`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from src.core.utils.config import LlamaCppSettings
from src.core.utils.exceptions import BatchAbortedError
from src.infrastructure.llm.llamacpp_client import LlamaCppClient


@dataclass
class LaneStats:
    succeeded: int = 0
    failed: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0  # wall time with at least one request in flight
    taken_out: int = 0
    rejoined: int = 0


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
    up: bool = True
    epoch: int = 0
    in_flight: int = 0
    _busy_since: float = 0.0

    def __post_init__(self) -> None:
        root = self.settings.server_url.root
        key = self.settings.api_key
        self.client = LlamaCppClient(
            root,
            timeout=self.request_timeout,
            api_key=key,
            max_connections=self.capacity,
            connect_timeout=10,
        )
        self.gate = LlamaCppClient(root, timeout=self.settings.timeout, api_key=key)

    def serves(self, model: str | None) -> bool:
        return model is None or model in self.served_models or model == self.model

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.gate.aclose()


@dataclass(eq=False)
class _Waiter:
    model: str | None
    alone: bool
    future: asyncio.Future


class Dispatcher:
    """Hands out lane slots; `take` / `give` around every request.

    Crash suspects (`alone=True`) run one at a time, each on a lane with nothing else in flight;
    while any suspect waits or runs, no other request starts, so a crash can only be blamed on
    the request that ran alone.
    """

    def __init__(self, lanes: list[Lane], ready_timeout: float) -> None:
        self.lanes = lanes
        self.ready_timeout = ready_timeout
        self.suspects = 0
        self._solo_running = False
        self._waiters: deque[_Waiter] = deque()
        self._all_down_since: float | None = None

    @property
    def in_flight(self) -> int:
        return sum(lane.in_flight for lane in self.lanes)

    def serves(self, model: str | None) -> bool:
        return any(lane.serves(model) for lane in self.lanes)

    async def take(self, model: str | None, *, alone: bool = False) -> Lane:
        """A lane with a slot for a request (for `alone`: a lane with nothing in flight).

        Raises `BatchAbortedError` once every lane has been down for `ready_timeout`.
        """
        lane = self._pick(model, alone)
        if lane is not None:
            self._enter(lane, alone)
            return lane
        waiter = _Waiter(model, alone, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter.future), self._deadline())
                except TimeoutError:
                    if waiter.future.done():
                        return waiter.future.result()
                    if self._all_down_too_long():
                        names = ", ".join(lane.name for lane in self.lanes)
                        what = (
                            f"llama-server {names} was not usable"
                            if len(self.lanes) == 1
                            else f"no llama-server of the fleet was usable ({names})"
                        )
                        raise BatchAbortedError(
                            f"{what} for {self.ready_timeout:g} s: it stopped answering. Every "
                            "finished result is saved; rerun the batch to do the rest."
                        ) from None
                    self._hand_out()  # a lane may have come back meanwhile
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.give(waiter.future.result(), alone=alone)  # handed over as we left
            raise
        finally:
            self._drop(waiter)

    def give(self, lane: Lane, *, alone: bool = False) -> None:
        """Return a slot taken with `take`."""
        lane.in_flight -= 1
        if not lane.in_flight:
            lane.stats.busy_s += time.monotonic() - lane._busy_since
        if alone:
            self._solo_running = False
        self._hand_out()

    def add_suspect(self) -> None:
        self.suspects += 1

    def remove_suspect(self) -> None:
        self.suspects -= 1
        if not self.suspects:
            self._hand_out()

    def lane_down(self, lane: Lane) -> bool:
        """Mark `lane` down (True if it was up); its watcher brings it back."""
        if not lane.up:
            return False
        lane.up = False
        lane.stats.taken_out += 1
        if not any(other.up for other in self.lanes):
            self._all_down_since = time.monotonic()
        return True

    def lane_up(self, lane: Lane) -> None:
        if lane.up:
            return
        lane.up = True
        lane.epoch += 1
        lane.stats.rejoined += 1
        self._all_down_since = None
        self._hand_out()

    # -- plumbing ------------------------------------------------------------------------------

    def _pick(self, model: str | None, alone: bool) -> Lane | None:
        best = None
        for lane in self.lanes:
            if not lane.up or not lane.serves(model):
                continue
            if alone:
                if not self._solo_running and lane.in_flight == 0:
                    return lane
            elif (
                not self.suspects
                and lane.in_flight < lane.capacity
                and (
                    best is None or lane.in_flight / lane.capacity < best.in_flight / best.capacity
                )
            ):
                best = lane
        return best

    def _enter(self, lane: Lane, alone: bool) -> None:
        if not lane.in_flight:
            lane._busy_since = time.monotonic()
        lane.in_flight += 1
        if alone:
            self._solo_running = True

    def _hand_out(self) -> None:
        """Give free slots to waiters, oldest first, each to a lane that serves its model."""
        index = 0
        while index < len(self._waiters):
            waiter = self._waiters[index]
            lane = None if waiter.future.done() else self._pick(waiter.model, waiter.alone)
            if lane is None:
                if waiter.model is None and not waiter.alone and not self.suspects:
                    return  # no slot for a request that fits anywhere: none for the rest either
                index += 1
                continue
            del self._waiters[index]
            self._enter(lane, waiter.alone)
            waiter.future.set_result(lane)

    def _drop(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _deadline(self) -> float:
        if self._all_down_since is None:
            return 1.0  # look again now and then
        left = self.ready_timeout - (time.monotonic() - self._all_down_since)
        return max(left, 0.0) + 0.01

    def _all_down_too_long(self) -> bool:
        return (
            self._all_down_since is not None
            and time.monotonic() - self._all_down_since >= self.ready_timeout
        )
