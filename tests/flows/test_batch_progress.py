"""Batch progress: the Prefect progress artifact, and the terminal bar when a person watches."""

from __future__ import annotations

import io
import sys

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

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

    assert await watched() == 10
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["llamacpp-batch-progress"]))
        )
    assert artifacts and artifacts[-1].data == 100.0
    assert "llama.cpp batch" in terminal.getvalue()
    assert "10/10" in terminal.getvalue() and "1 failed" in terminal.getvalue()
