"""Batch progress: the Prefect progress artifact, and the terminal bar when a person watches."""

from __future__ import annotations

import io
import sys

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from prefect_llamacpp.flows import batch_progress
from prefect_llamacpp.flows.batch_progress import BatchProgress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_artifact_and_terminal_bar(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(batch_progress, "MIN_UPDATE_GAP_S", 0.0)
    monkeypatch.setattr(batch_progress, "MAX_UPDATE_GAP_S", 0.0)

    @flow
    async def watched() -> float:
        progress = await BatchProgress.start(10, done=2)
        for index in range(8):
            progress.advance(failed=int(index == 0))
        await progress.finish()
        return progress.finished

    state = await watched(return_state=True)
    assert await state.result() == 10
    async with get_client() as client:
        # This run's artifact only: other batch tests in the session write the same key.
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["llamacpp-batch-progress"])),
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            ),
        )
    assert len(artifacts) == 1 and artifacts[0].data == 100.0
    assert "llama.cpp batch" in terminal.getvalue()
    assert "10/10" in terminal.getvalue() and "1 failed" in terminal.getvalue()


def test_artifact_updates_thin_out_as_a_run_goes_on():
    def updates(run_s: float) -> int:  # what `advance` does with a result every 0.1 s
        count, last, now = 0, 0.0, 0.0
        while now < run_s:
            now += 0.1
            if now - last >= batch_progress.update_gap(now):
                count, last = count + 1, now
        return count

    assert 4 <= updates(10) <= 5  # every 2 s while the run is young
    assert updates(40) <= 12  # 20 at a fixed 2 s
    assert 100 <= updates(3600) <= 140  # at most 30 s apart: the UI still moves
    assert batch_progress.update_gap(10_000) == batch_progress.MAX_UPDATE_GAP_S
