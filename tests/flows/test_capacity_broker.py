"""The capacity broker against Prefect's own API (the test harness): runs sharing one server's
limit never hold more than it, every run gets its share, and slots come back."""

from __future__ import annotations

import asyncio
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

from prefect_llamacpp.batch.dispatch import Dispatcher, Lane
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.flows.capacity import SlotBroker, _held, limit_names

PERIOD = 0.2


def server_root() -> str:
    return f"http://{uuid.uuid4().hex[:8]}.example:8080"  # a server of its own per test


async def start_run(root: str, priority: int = 1) -> tuple[SlotBroker, Lane]:
    """A run on a 4-slot server with queue depth 1 (a limit of 5), wanting all 5."""
    lane = Lane("a", LlamaCppSettings(base_url=root + "/v1"), "m", 5)
    lane.total_slots = 4
    broker = SlotBroker(
        [lane], Dispatcher([lane], 60), queue_depth=1, priority=priority, period=PERIOD
    )
    await broker.start()
    return broker, lane


async def held(name: str) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).active_slots


async def settle(runs, expected, seconds: float = 30.0) -> list[int]:
    """The grants once `expected(grants)` has held for a second (the brokers converge within a
    few periods; a loaded machine makes the Prefect API slower, hence the generous bound),
    checking all the while that together they never exceed the limit."""
    loop = asyncio.get_running_loop()
    deadline, since = loop.time() + seconds, None
    while True:
        assert sum(_held(b._servers[0]) for b, _ in runs) <= 5
        grants = [lane.granted for _, lane in runs]
        if not expected(grants):
            since = None
        elif since is None:
            since = loop.time()
        elif loop.time() - since >= 1.0:
            return grants
        if loop.time() > deadline:
            return grants  # the caller's assertion says what they were
        await asyncio.sleep(0.05)


def equal(value):
    return lambda grants: grants == value


def shared(grants) -> bool:
    """Every slot given out, and each run at least its rounded-down share."""
    return sum(grants) == 5 and min(grants) >= 5 // len(grants)


async def test_runs_share_a_server_and_none_starves():
    root = server_root()
    runs = [await start_run(root)]
    assert await settle(runs, equal([5])) == [5]  # alone: every slot
    for _ in range(3):
        runs.append(await start_run(root))
        grants = await settle(runs, shared)
        assert shared(grants), grants
    # Four runs on five slots: one each at least, the fifth to one of them.
    assert sorted(grants) == [1, 1, 1, 2]
    first, _ = runs.pop(0)
    await first.aclose()
    grants = await settle(runs, shared)
    assert shared(grants), grants
    for broker, _ in runs:
        await broker.aclose()
    slots, wants_runs = limit_names(root)[0], limit_names(root)[1:]
    assert await held(slots) == 0 and [await held(name) for name in wants_runs] == [0, 0]


async def test_a_higher_priority_takes_more():
    root = server_root()
    runs = [await start_run(root, priority=1), await start_run(root, priority=4)]
    assert await settle(runs, equal([1, 4])) == [1, 4]
    for broker, _ in runs:
        await broker.aclose()


async def test_a_limit_deactivated_turns_the_broker_off_and_deleted_comes_back():
    root = server_root()
    slots = limit_names(root)[0]
    runs = [await start_run(root)]
    await settle(runs, equal([5]))
    async with get_client() as client:
        await client.update_global_concurrency_limit(
            slots, GlobalConcurrencyLimitUpdate(active=False)
        )
        # Not held back: the server's capacity only.
        assert await settle(runs, equal([None])) == [None]
        await client.update_global_concurrency_limit(
            slots, GlobalConcurrencyLimitUpdate(active=True)
        )
        assert await settle(runs, equal([5])) == [5]
        await client.delete_global_concurrency_limit_by_name(limit_names(root)[1])  # runs limit
    assert await settle(runs, equal([5])) == [5]
    assert not runs[0][0]._loop.done(), "the broker stopped"
    await runs[0][0].aclose()
