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

from flows import batch_progress
from flows.batch_progress import BatchProgress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_artifact_and_terminal_bar(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(batch_progress, "UPDATE_EVERY_S", 0.0)

    @flow
    async def watched() -> float:
        progress = await BatchProgress.start(10, done=2)
        for index in range(8):
            progress.advance(failed=index == 0)
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
