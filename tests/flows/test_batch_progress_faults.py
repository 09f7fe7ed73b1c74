"""Artifacts and the progress bar when things fail: the run's own outcome stands, the bar stops,
and no call to the Prefect API is left running or unread (review repros, kept as tests)."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import sys

import pytest

from prefect_llamacpp.batch.ledger import Ledger
from prefect_llamacpp.flows import batch as batch_module
from prefect_llamacpp.flows import batch_progress
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from prefect_llamacpp.flows.batch_progress import BatchProgress
from tests.flows.conftest import flow_run_record
from tests.flows.test_batch_flow import read_output, save_block, write_input

pytestmark = pytest.mark.integration


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars(monkeypatch):
    """The terminal bar of every BatchProgress started (a person watching)."""
    seen = []
    start = BatchProgress.start.__func__

    async def watched_start(cls, *args, **kwargs):
        # Here, not at setup: pytest's own capture replaces stderr when the test starts.
        monkeypatch.setattr(sys, "stderr", FakeTerminal())
        progress = await start(cls, *args, **kwargs)
        seen.append(progress._bar)
        return progress

    monkeypatch.setattr(BatchProgress, "start", classmethod(watched_start))
    return seen


@pytest.fixture
def asyncio_errors(caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")

    def errors() -> list[str]:
        gc.collect()
        return [
            r.getMessage()
            for r in caplog.records
            if "never retrieved" in r.getMessage() or "pending" in r.getMessage()
        ]

    return errors


def progress_api_down(monkeypatch) -> None:
    async def refuse(*args, **kwargs):
        raise RuntimeError("Prefect API down (progress artifact)")

    monkeypatch.setattr(batch_progress, "acreate_progress_artifact", refuse)


async def run(name, tmp_path, lines=6):
    source = write_input(tmp_path / "in.jsonl", lines)
    return await llamacpp_batch_flow(
        str(source),
        str(tmp_path / "out.jsonl"),
        server=name,
        return_state=True,
        request={"max_tokens": 4},
    )


async def test_a_run_whose_progress_artifact_fails_completes_with_its_summary(
    server, registered_block_type, tmp_path, monkeypatch, bars, asyncio_errors
):
    progress_api_down(monkeypatch)
    state = await run(await save_block("faults", server), tmp_path)
    assert state.is_completed(), state.message
    assert len(read_output(tmp_path / "out.jsonl")) == 6
    record = await flow_run_record(state.state_details.flow_run_id)
    assert "llamacpp-batch-summary" in [artifact.key for artifact in record["artifacts"]]
    (bar,) = bars
    assert not bar.live.is_started
    assert not asyncio_errors()


async def test_a_failing_disk_is_the_reason_given_not_the_prefect_api(
    server, registered_block_type, tmp_path, monkeypatch, bars
):
    progress_api_down(monkeypatch)
    append, count = Ledger._append, 0

    def full_disk(self, data):
        nonlocal count
        count += 1
        if count == 3:
            raise OSError(28, "No space left on device")
        return append(self, data)

    monkeypatch.setattr(Ledger, "_append", full_disk)
    state = await run(await save_block("faults", server), tmp_path)
    assert state.is_failed()
    assert "No space left" in state.message, state.message
    (bar,) = bars
    assert not bar.live.is_started


async def test_an_fsync_error_at_the_end_still_stops_the_bar_and_reads_every_call(
    server, registered_block_type, tmp_path, monkeypatch, bars, asyncio_errors
):
    progress_api_down(monkeypatch)

    def sync(self):
        raise OSError(5, "Input/output error (fsync)")

    monkeypatch.setattr(Ledger, "sync", sync)
    state = await run(await save_block("faults", server), tmp_path)
    assert state.is_failed() and "Input/output error" in state.message, state.message
    (bar,) = bars
    assert not bar.live.is_started
    assert not asyncio_errors()


async def test_a_summary_the_api_refuses_leaves_nothing_pending(
    server, registered_block_type, tmp_path, monkeypatch, bars, asyncio_errors
):
    update = batch_progress.aupdate_progress_artifact

    async def slow_update(*args, **kwargs):
        await asyncio.sleep(2)
        return await update(*args, **kwargs)

    async def refuse(*args, **kwargs):
        raise RuntimeError("Prefect API down (summary)")

    monkeypatch.setattr(batch_progress, "aupdate_progress_artifact", slow_update)
    monkeypatch.setattr(batch_module, "acreate_markdown_artifact", refuse)
    state = await run(await save_block("faults", server), tmp_path, lines=4)
    assert state.is_completed(), state.message
    assert not [task for task in asyncio.all_tasks() if "finish" in repr(task.get_coro())]
    (bar,) = bars
    assert not bar.live.is_started
    assert not asyncio_errors()
