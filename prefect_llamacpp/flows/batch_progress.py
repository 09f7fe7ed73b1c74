"""Batch progress: a Prefect progress artifact and, when a person is watching a terminal, a
progress bar.

The artifact is updated every 2 s at first, then less often as the run goes on (a quarter of the
time it has run, at most 30 s apart): each update is an API call and an event the Prefect server
stores, CPU that a llama-server on the same machine lacks. An hour-long run makes about 130
updates instead of 1,800."""

from __future__ import annotations

import asyncio
import sys
import time

from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

MIN_UPDATE_GAP_S = 2.0
MAX_UPDATE_GAP_S = 30.0


def update_gap(elapsed: float) -> float:
    """Seconds from one artifact update to the next, `elapsed` seconds into the run."""
    return min(MAX_UPDATE_GAP_S, max(MIN_UPDATE_GAP_S, elapsed / 4))


class BatchProgress:
    def __init__(
        self, total_lines: int, done: int, creating: asyncio.Task, bar: Progress | None
    ) -> None:
        self.total = max(total_lines, 1)
        self.finished = done
        self.failed = 0
        self._creating = creating  # the artifact's creation; its result is the artifact's id
        self._bar = bar
        self._bar_task = (
            bar.add_task("batch", total=self.total, completed=done, failed=0) if bar else None
        )
        self._started = self._last_update = time.monotonic()
        self._update: asyncio.Task | None = None

    @classmethod
    async def start(cls, total_lines: int, done: int = 0) -> BatchProgress:
        """Starts the bar and the artifact's creation; the run does not wait for the API (one
        call less before the first request). `finish` must follow, whatever happens."""
        creating = asyncio.get_running_loop().create_task(
            acreate_progress_artifact(
                progress=_percent(done, total_lines),
                key="llamacpp-batch-progress",
                description="Share of input lines finished (succeeded, failed, or done earlier).",
            )
        )
        bar = None
        if sys.stderr.isatty():
            bar = Progress(
                TextColumn("[bold]llama.cpp batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),  # stdout stays clean for the CLI's summary
                transient=False,
            )
            bar.start()
        return cls(total_lines, done, creating, bar)

    def advance(self, lines: int = 1, failed: int = 0) -> None:
        """`lines` more lines done, `failed` of them failed."""
        self.finished += lines
        self.failed += failed
        if self._bar:
            self._bar.update(self._bar_task, completed=self.finished, failed=self.failed)
        now = time.monotonic()
        if (
            now - self._last_update >= update_gap(now - self._started)
            and self._creating.done()
            and (self._update is None or self._update.done())
        ):
            self._last_update = now
            if self._creating.cancelled() or self._creating.exception():
                return  # `finish` says why
            self._update = asyncio.get_running_loop().create_task(
                aupdate_progress_artifact(
                    self._creating.result(), _percent(self.finished, self.total)
                )
            )

    async def finish(self) -> None:
        """The last figure (raises what the Prefect API raised); the bar stops either way."""
        try:
            if self._update:
                await asyncio.gather(self._update, return_exceptions=True)
            artifact_id = await self._creating
            await aupdate_progress_artifact(artifact_id, _percent(self.finished, self.total))
        finally:
            self._stop_bar()

    async def close(self) -> None:
        """Whatever happened: the bar stops and no call to the API is left running or unread.
        Safe to call more than once, and after `finish`."""
        self._stop_bar()
        for call in (self._update, self._creating):
            if call is not None and not call.done():
                call.cancel()
            if call is not None:
                await asyncio.gather(call, return_exceptions=True)

    def _stop_bar(self) -> None:
        if self._bar:
            self._bar.stop()
            self._bar = None


def _percent(done: int, total: int) -> float:
    return round(min(100.0, 100.0 * done / max(total, 1)), 1)
