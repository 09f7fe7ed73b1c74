"""The capacity broker: the runs that share a llama-server share its slots, through Prefect.

Each server has a Prefect global concurrency limit, `llamacpp-slots-<server>`, created sized
`total_slots + queue_depth` from `/props` (an operator may resize it in the UI; deactivating it
turns the broker off for that server). A run holds one leased slot of it for each request it may
have in flight there, so all runs together never exceed it; a run that dies returns its slots
when their leases lapse.

Taking a Prefect slot per request would cost an API round trip per answer (a short answer costs
the client about 3 ms), so a run holds a *grant* of slots for as long as it keeps them busy and
the dispatcher keeps its requests within it (`Lane.granted`). Grants follow demand: every run on a
server also holds `priority` slots of `llamacpp-runs-<server>` (a limit nobody fills: its active
slots are the sum of the priorities of the runs alive on the server), and every `period` seconds
takes its share of the slots, `priority / sum of priorities` (alone: all of them), shrinking as
its requests finish or growing from slots that others freed. Shares are whole slots: a run keeps
at least the share rounded down (and one), and takes the rounded-up share while no run is below
its own; a run below its share says so by holding a slot of `llamacpp-wants-<server>`, and the
others give back what they hold beyond theirs. More runs than slots: the later ones wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL

from prefect_llamacpp.batch.dispatch import Dispatcher, Lane
from prefect_llamacpp.log import get_logger_with_context

logger = get_logger_with_context("capacity")

PERIOD_SECONDS = 2.0  # how soon a run takes its share after another run comes or goes
RUNS_LIMIT = 1_000_000  # the runs-limit only counts: it never refuses


def limit_names(server_root: str) -> tuple[str, str, str]:
    """(slots, runs, wants) limits of a server, by its root URL: readable in the Prefect UI
    (host and port), unique (a hash of the whole root, reverse-proxy prefix included)."""
    host = re.sub(r"^[a-z]+://", "", server_root).split("/", 1)[0]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", host)[:40].strip("-")
    digest = hashlib.sha256(server_root.rstrip("/").encode()).hexdigest()[:10]
    return tuple(f"llamacpp-{kind}-{base}-{digest}" for kind in ("slots", "runs", "wants"))


def shares(slots: int, priority: int, priorities: int) -> tuple[int, int]:
    """A run's share of a server's `slots` when the runs on it sum to `priorities`, rounded
    down and up (at least one each)."""
    exact = slots * priority / max(priorities, priority)
    # Every other run keeps at least one slot (they number at most `priorities - priority`):
    # rounded-down shares never add up past the slots while runs <= slots.
    low = min(math.floor(exact), slots - (max(priorities, priority) - priority))
    return max(1, low), max(1, math.ceil(exact))


@dataclass(eq=False)
class _Server:
    lane: Lane
    slots_limit: str
    runs_limit: str
    wants_limit: str
    # (lease, slots): the first grant is one lease of several slots (one write to the Prefect
    # database, where writes contend with the run's own); later ones are a slot each.
    leases: list[tuple[UUID, int]] = field(default_factory=list)
    presence: UUID | None = None  # our `priority` slots of the runs-limit
    wanting: UUID | None = None  # our slot of the wants-limit while below our share
    brokered: bool = True  # False: the limit is deactivated, the run is not held back
    starved_since: float | None = None  # since when it has held no slot


def _held(server: _Server) -> int:
    return sum(size for _, size in server.leases)


class SlotBroker:
    """Holds a run's grants on every server of its fleet; `start`, then `aclose` at the end."""

    def __init__(
        self,
        lanes: list[Lane],
        dispatcher: Dispatcher,
        *,
        queue_depth: int,
        priority: int = 1,
        lease_seconds: float = 60,
        period: float = PERIOD_SECONDS,
    ) -> None:
        self._dispatcher = dispatcher
        self._queue_depth = queue_depth
        self.priority = priority
        self._lease_seconds = lease_seconds
        self._period = period
        self._servers = [
            _Server(lane, *limit_names(lane.settings.server_url.root)) for lane in lanes
        ]
        for server in self._servers:
            dispatcher.regrant(server.lane, 0)  # nothing goes out before the first grant
        self._client: PrefectClient | None = None
        self._loop: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        context = FlowRunContext.get()
        self._holder = (
            ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id)
            if context is not None and context.flow_run is not None
            else None
        )

    def granted(self) -> dict[str, int]:
        """Slots held per server name (for the summary and tests)."""
        return {server.lane.name: _held(server) for server in self._servers}

    async def start(self) -> None:
        """Start taking grants, beside the run: its first requests wait for the first slots
        (each slot is used the moment it is granted), not for the whole first round of calls."""
        self._client = get_client()
        await self._client.__aenter__()
        try:
            for server in self._servers:
                if not server.lane.pending and not server.lane.retired:
                    await self._first_grant(server)
        except (httpx.HTTPError, OSError) as exc:  # the loop tries again every period
            logger.warning("The capacity broker could not reach Prefect", fault=str(exc))
        self._stopping = asyncio.Event()
        self._loop = asyncio.create_task(self._every_period())

    async def aclose(self) -> None:
        """Give every slot back (leases that cannot be released lapse by themselves)."""
        if self._loop is not None:
            self._stopping.set()  # not cancelled: a slot being taken is recorded, then released
            await asyncio.gather(self._loop, return_exceptions=True)
        if self._client is None:
            return
        leases = [lease for server in self._servers for lease, _ in server.leases]
        for server in self._servers:
            leases += [lease for lease in (server.presence, server.wanting) if lease is not None]
        for lease in leases:
            try:
                await self._release(lease)
            except Exception as exc:  # it lapses by itself
                logger.warning("A slot could not be given back", fault=str(exc))
        for server in self._servers:
            server.leases.clear()
            server.presence = server.wanting = None
        await self._client.__aexit__(None, None, None)
        self._client = None

    async def _every_period(self) -> None:
        renewed = asyncio.get_running_loop().time()
        while not self._stopping.is_set():
            now = asyncio.get_running_loop().time()
            try:
                if now - renewed >= self._lease_seconds / 3:
                    await self._renew()
                    renewed = now
                await self._tick()
            except (httpx.HTTPError, OSError) as exc:
                # The Prefect API did not answer: the grants held stay (their leases outlive a
                # short outage); the next period tries again.
                logger.warning("The capacity broker could not reach Prefect", fault=str(exc))
            except Exception as exc:
                # Never a run stuck without slots for a broker that broke: it goes on alone,
                # within each server's capacity, and says so.
                logger.error(
                    "The capacity broker stopped; this run goes on without it", fault=repr(exc)
                )
                for server in self._servers:
                    self._dispatcher.regrant(server.lane, None)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._period)

    async def _tick(self) -> None:
        # One call at a time: concurrent slot writes contend for the Prefect database (5 leases
        # taken at once took 2.3 s on SQLite, one after another 7 ms each).
        for server in self._servers:
            await self._adjust(server)

    async def _adjust(self, server: _Server) -> None:
        lane = server.lane
        if lane.pending or lane.retired:
            return  # shaped (its slots known) when it joins
        slots = await self._read(server.slots_limit, lane.total_slots + self._queue_depth)
        if not slots.active:  # deactivated in the UI: this server is not brokered
            if server.brokered:
                server.brokered = False
                self._dispatcher.regrant(lane, None)
            return
        server.brokered = True
        if server.presence is None:
            if not server.leases:
                await self._first_grant(server, slots)
            await self._read(server.runs_limit, RUNS_LIMIT)  # made if missing
            server.presence = await self._take(server.runs_limit, self.priority)
        runs = await self._read(server.runs_limit, RUNS_LIMIT)
        wants = await self._read(server.wants_limit, RUNS_LIMIT)
        others_wanting = wants.active_slots - (server.wanting is not None)
        low, high = shares(slots.limit, self.priority, runs.active_slots)
        target = min(lane.capacity, high if others_wanting <= 0 else low)
        held = _held(server)
        if target < held:
            self._dispatcher.regrant(lane, target)
            # Slots still covering requests in flight are released at a later period.
            await self._give_back(server, held - max(target, lane.in_flight))
        elif target > held:
            for _ in range(target - held):
                lease = await self._take(server.slots_limit, 1)
                if lease is None:
                    break  # full: the others shrink to their shares within a period
                server.leases.append((lease, 1))
                self._dispatcher.regrant(lane, _held(server))  # each slot used at once
        elif lane.granted != held:
            self._dispatcher.regrant(lane, held)
        below = _held(server) < min(lane.capacity, low)
        if below and server.wanting is None:
            server.wanting = await self._take(server.wants_limit, 1)
        elif not below and server.wanting is not None:
            await self._release(server.wanting)
            server.wanting = None
        self._watch_starving(server, slots.limit)

    async def _first_grant(self, server: _Server, slots=None) -> None:
        """The free slots up to the run's capacity, in one call: a run alone starts at full
        speed; beside others it finds the limit full, or gives back what is beyond its share at
        the next period."""
        lane = server.lane
        slots = slots or await self._read(server.slots_limit, lane.total_slots + self._queue_depth)
        free = min(lane.capacity, slots.limit - slots.active_slots)
        if slots.active and free > 0 and (lease := await self._take(server.slots_limit, free)):
            server.leases.append((lease, free))
            self._dispatcher.regrant(lane, free)

    async def _give_back(self, server: _Server, spare: int) -> None:
        """Release `spare` slots none of the run's requests is using. The first grant's block
        is split by releasing it and taking back what is kept, a slot at a time: its requests
        in flight are within what is kept, and a run that took the freed slots meanwhile took
        no more than its own share, so what is kept stays free but for a rare race (then the
        grant shrinks to what came back, and a request or two in flight finish over it)."""
        while spare > 0 and server.leases:
            lease, size = server.leases.pop()
            await self._release(lease)
            spare -= size
            for _ in range(-spare if spare < 0 else 0):  # a block larger than the spare
                kept = await self._take(server.slots_limit, 1)
                if kept is None:
                    break
                server.leases.insert(0, (kept, 1))
            spare = max(spare, 0)
        self._dispatcher.regrant(server.lane, min(server.lane.granted or 0, _held(server)))

    def _watch_starving(self, server: _Server, slots: int) -> None:
        """Say so when a run gets no slot for longer than a dead run's leases last."""
        now = asyncio.get_running_loop().time()
        if server.leases:
            server.starved_since = None
        elif server.starved_since is None:
            server.starved_since = now
        elif now - server.starved_since > 2 * self._lease_seconds + 30:
            server.starved_since = now  # said again a while later, not every period
            logger.warning(
                "No slot of this server has been free for this run; the runs holding them are "
                "alive, or the Prefect server reclaims no lapsed lease (its repossessor service "
                "is off). See or reset the limit in the Prefect UI (Concurrency), or run with "
                "run.broker = false",
                server=server.lane.name,
                limit=server.slots_limit,
                slots=slots,
            )

    async def _read(self, name: str, size: int):
        """Limit `name`, created with `size` slots if it is missing (first use, or deleted by
        hand: an operator resizes or deactivates a limit in the UI; a deleted one comes back)."""
        try:
            return await self._client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                await self._client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=size)
                )
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass
            return await self._client.read_global_concurrency_limit_by_name(name)

    async def _take(self, name: str, slots: int) -> UUID | None:
        """A lease on `slots` of limit `name`, or None when they are taken (nothing waits)."""
        try:
            response = await self._client.increment_concurrency_slots_with_lease(
                names=[name],
                slots=slots,
                mode="concurrency",
                lease_duration=self._lease_seconds,
                holder=self._holder,
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:  # full
                return None
            raise
        return UUID(response.json()["lease_id"])

    async def _release(self, lease: UUID) -> None:
        try:
            await self._client.release_concurrency_slots_with_lease(lease)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:  # 404: it had lapsed already
                raise

    async def _renew(self) -> None:
        for server in self._servers:
            leases = list(server.leases)
            for entry in leases:
                if not await self._renew_one(entry[0]):
                    server.leases.remove(entry)  # lapsed (this process stalled): slots gone
            if server.presence is not None and not await self._renew_one(server.presence):
                server.presence = None
            if server.wanting is not None and not await self._renew_one(server.wanting):
                server.wanting = None  # taken again at the next period while still below
            if len(server.leases) != len(leases):
                logger.warning(
                    "Slot leases lapsed; the run keeps fewer requests in flight",
                    server=server.lane.name,
                    lost=len(leases) - len(server.leases),
                )
                self._dispatcher.regrant(server.lane, _held(server))

    async def _renew_one(self, lease: UUID) -> bool:
        try:
            await self._client.renew_concurrency_lease(lease, lease_duration=self._lease_seconds)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (404, 410):
                return False
            raise
        return True


@asynccontextmanager
async def canary_slot(server_root: str, wait_seconds: float) -> AsyncIterator[str | None]:
    """One slot of a brokered server for a health canary, for the body. Yields None when it holds
    one or the server is not brokered (no shared Prefect API, no active limit); else why not:
    no slot freed within `wait_seconds` (the canary's own first-byte deadline), so the canary
    is sent beside the runs holding them all."""
    if not PREFECT_API_URL.value():
        yield None
        return
    name = limit_names(server_root)[0]
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            limit = None
        if limit is None or not limit.active:
            yield None
            return
        lease = None
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while lease is None and asyncio.get_running_loop().time() < deadline:
            try:
                response = await client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=60
                )
                lease = UUID(response.json()["lease_id"])
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                await asyncio.sleep(0.25)
        try:
            yield None if lease else f"every slot held by batch runs for {wait_seconds:g} s"
        finally:
            if lease is not None:
                await client.release_concurrency_slots_with_lease(lease)
