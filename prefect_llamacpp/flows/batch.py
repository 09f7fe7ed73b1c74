"""The batch inference flow: JSONL prompts through a llama-server, resumable, losing nothing.

    llamacpp-batch prompts.jsonl results.jsonl --server my-llama --max-tokens 256
    (in this repository also: python -m flows.batch ...)

Gate first (wait through loading, check the key, detect the model), then stream the input in
chunks; each chunk is one Prefect task whose prompts run concurrently, at most `run.concurrency`
(default: the server's `total_slots + queue_depth`) in flight per server. Results are appended
to the output file as they finish; a rerun skips what already succeeded. The formats:
docs/batch.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import CliApp, CliPositionalArg

from prefect_llamacpp.batch.dispatch import Lane
from prefect_llamacpp.batch.jsonl_input import (
    BatchItem,
    InputError,
    InputReader,
    Shard,
    sample_input,
    scan_input,
)
from prefect_llamacpp.batch.ledger import Ledger
from prefect_llamacpp.batch.options import RequestOptions, RunOptions, option_names
from prefect_llamacpp.batch.published import PublishedLedger
from prefect_llamacpp.batch.records import OutputFormat, ResultLine, result_line
from prefect_llamacpp.batch.runner import BatchOptions, BatchRunner
from prefect_llamacpp.embedding_probe import packed_embeddings_problem
from prefect_llamacpp.exceptions import (
    BatchAbortedError,
    BatchPathError,
    ConfigurationError,
    NotSupportedError,
)
from prefect_llamacpp.flows.batch_progress import BatchProgress
from prefect_llamacpp.flows.capacity import SlotBroker
from prefect_llamacpp.flows.fleet import FleetMember, gate_fleet, resolve_servers, server_names
from prefect_llamacpp.flows.launched import launched_member
from prefect_llamacpp.flows.local_api import cli_config, cli_problem, run_cli
from prefect_llamacpp.flows.output_lease import output_lease
from prefect_llamacpp.flows.report import markdown_table, sparkline
from prefect_llamacpp.flows.storage_block import storage_from_block
from prefect_llamacpp.flows.telemetry import BatchTelemetry, pushgateway
from prefect_llamacpp.launch import LaunchSpec
from prefect_llamacpp.metrics import BatchFigures
from prefect_llamacpp.storage import (
    canonical_url,
    checked_input,
    checked_location,
    input_exists,
    input_size,
    is_url,
    local_path,
    shown,
    storage_credentials,
    under,
)

# Of an object-storage input, what is read before the first request: enough to see its kind of
# lines and estimate their number; the rest streams as the run goes.
URL_SAMPLE_BYTES = 16 * 1024 * 1024
CHUNKS_IN_FLIGHT = 2  # the next chunk fills slots while the last prompts of this one finish
# Most embedding text one chunk holds, in characters (5,000 documents of 3,000 or so).
CHUNK_TEXT_CHARS = 16_000_000


class ServerShare(BaseModel):
    """One server's part of a run."""

    server: str
    capacity: int
    succeeded: int = 0
    failed: int = 0
    completion_tokens_per_s: float = 0.0
    taken_out: int = 0
    rejoined: int = 0
    joined_late: bool = False  # not ready when the run started; joined when it was


class ShardShare(BaseModel):
    """One shard's part of a sharded batch."""

    shard: str
    flow_run: str
    attempts: int  # flow runs of this shard, over every parent run
    succeeded: int = 0
    failed: int = 0
    skipped_done: int = 0
    completion_tokens_per_s: float = 0.0


class BatchSummary(BaseModel):
    input_path: str
    output_path: str
    server: str
    base_url: str
    model: str
    concurrency: int
    output_format: OutputFormat = "native"
    errors_path: str | None = None  # the OpenAI format's errors file, once a line failed
    outcome: str = "completed"  # or "aborted"
    succeeded: int = 0
    failed: int = 0
    failed_by_kind: dict[str, int] = Field(default_factory=dict)
    skipped_done: int = 0
    retries: int = 0
    server_waits: int = 0
    crashes_seen: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_time_s: float = 0.0
    completion_tokens_per_s: float = 0.0
    chunks: int = 0
    max_in_flight: int = 0
    ledger_unreadable_lines: int = 0
    settings_changed: list[str] = Field(default_factory=list)
    skipped_servers: dict[str, str] = Field(default_factory=dict)
    servers: list[ServerShare] = Field(default_factory=list)
    shards: list[ShardShare] = Field(default_factory=list)  # a sharded batch's, one per shard
    abort_reason: str | None = None
    throughput: list[float] = Field(default_factory=list)  # lines/s over the run (its chart)


@task(
    name="llama.cpp batch chunk",
    description="Run one chunk of batch prompts concurrently; results go to the output ledger.",
    task_run_name="chunk-{number}",
    cache_policy=NO_CACHE,  # a rerun must ask the server, never replay a stored answer
    retries=0,  # the runner retries items itself; the ledger refuses a second success anyway
)
async def run_chunk(number: int, items: list[BatchItem], runner: BatchRunner) -> int:
    await runner.run(items)
    return len(items)


@flow(
    name="llamacpp-batch",
    description="Run a JSONL file of prompts through a llama.cpp server; resumable.",
    validate_parameters=True,
)
async def llamacpp_batch_flow(
    input_path: str,
    output_path: str,
    server: str | list[str] | None = None,
    request: RequestOptions = RequestOptions(),
    run: RunOptions = RunOptions(),
    output_format: OutputFormat = "native",
    storage: str | None = None,
    shard: str | None = None,
    launch: LaunchSpec | str | None = None,
) -> BatchSummary:
    """Run every line of a JSONL file through one llama-server or a fleet; resumable.

    Fails before sending anything when the output is in use by another run, the named block does
    not exist, no server is ready within `run.ready_timeout`, or the settings differ from the
    ledger's (unless `run.allow_settings_change`); fails mid-run, with every finished result
    saved, when no server has been usable for `run.ready_timeout`. Rerun to finish.

    Args:
        input_path: JSONL file of prompts: `{"custom_id", "prompt"}`, `{"custom_id",
            "messages"}` or OpenAI Batch API request lines.
        output_path: JSONL results file, the ledger: appended to, one line per input line; a
            rerun skips what is answered. Never the input file.
        server: Name of a saved llama.cpp Server block, or a list of names for a fleet. Left
            out: the block saved as `llamacpp`, else the LLAMACPP_* settings.
        request: What to ask: the settings of every request (`RequestOptions`).
        run: How to run: in flight, timeouts, attempts, chunks (`RunOptions`).
        output_format: `native` (our result lines) or `openai` (OpenAI Batch output lines, the
            server's answer as the body; failed lines also in `<output>.errors.jsonl`). A rerun
            must ask for the format its output file holds.
        storage: A storage block whose credentials open the input and output URLs:
            `remote-file-system/NAME`, or `s3-bucket/NAME` (prefect-aws); paths are then read
            under its base URL. Left out: the storage library's own (environment, ~/.aws, role).
        shard: `K/N`: run only the lines of shard K of N (set by a sharded batch's parent run
            for each shard it starts; `run.shards` splits a batch).
        launch: Start a llama-server for this run on the worker: the name of a saved
            llama.cpp Launch block, or a launch spec (model path or URL, slots, context...).
            It is watched, restarted if wedged, and stopped when the run ends. With `server`
            too, the run uses both. A sharded batch starts one per shard.

    Returns:
        The run's `BatchSummary` (also written as the `llamacpp-batch-summary` artifact).
    """
    logger = get_run_logger()
    base, options = await storage_from_block(storage) if storage else (None, None)
    with (
        storage_credentials(base.split("://", 1)[0], options) if base else contextlib.nullcontext()
    ):
        job = _check_job(
            under(input_path, base),
            under(output_path, base),
            server,
            request,
            run,
            output_format,
            shard,
            launch,
        )
        if run.shards > 1 and job.shard is None:
            from prefect_llamacpp.flows.shards import run_shards

            return await run_shards(job, storage, logger)
        return await _batch(job, logger)


async def _batch(job: _Job, logger) -> BatchSummary:
    output_format = job.output_format
    async with contextlib.AsyncExitStack() as closing:
        published = await _open_published(job, closing, logger)
        ledger = closing.enter_context(
            Ledger.open(
                published.local if published else job.target,
                local_path(job.source),
                output_format=output_format,
            )
        )
        launched = None
        if job.launch is not None:  # after the lease and lock: a refused run starts nothing
            launched = await closing.enter_async_context(launched_member(job.launch))
        lanes, summary, options = await _open_fleet(job, ledger, closing, logger, launched)
        if published is not None:
            await published.publish()  # the settings: proves the output writable, none sent yet
        progress = await BatchProgress.start(job.lines, done=len(ledger.state.done))
        closing.push_async_callback(progress.close)  # before the ledger closes, whatever happens
        private = {launched.label} if launched else set()
        await _run(job, lanes, summary, options, ledger, progress, logger, published, private)
    log_outcome(logger, summary)
    if summary.outcome == "aborted":
        raise BatchAbortedError(summary.abort_reason or "batch aborted")
    if job.shard is not None and published is not None:
        # The parent reads it to report the whole batch.
        await published.put_beside(".summary.json", summary.model_dump_json().encode())
    return summary


@dataclass(frozen=True)
class _Job:
    """A run's parameters, checked, and what a first read of the input found."""

    source: str | Path  # a local path or a URL (prefect_llamacpp/storage.py)
    output: str | Path  # as given: a local path or a URL
    target: Path | None  # the local output file; None for object storage
    server: str | list[str] | None
    request: RequestOptions
    run: RunOptions
    output_format: OutputFormat
    lines: int
    embedding_lines: int
    shard: Shard | None = None  # this run is one shard of a sharded batch
    launch: LaunchSpec | str | None = None  # a server this run starts itself
    gateway: str | None = None  # the Pushgateway the run's figures go to

    @property
    def fleet(self) -> bool:
        """Several servers (or a list of one): result lines name theirs, settings no model."""
        return isinstance(self.server, list) or (self.server is not None and bool(self.launch))

    @property
    def embeds(self) -> bool:
        """Whether any line may be embedded (so the servers' embeddings are checked)."""
        return self.request.embeddings or self.embedding_lines > 0


def _check_job(
    input_path,
    output_path,
    server,
    request,
    run,
    output_format,
    shard: str | None = None,
    launch: LaunchSpec | str | None = None,
) -> _Job:
    """What can be refused before anything is opened: a missing input, bad server names."""
    try:
        selected = Shard.parse(shard) if shard else None
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    for name, location in (("input_path", input_path), ("output_path", output_path)):
        if not str(location).strip():
            raise ConfigurationError(
                f"{name} is empty; give a path or URL (in a deployment: is the Prefect "
                "variable its template reads set?)"
            )
    source = checked_input(input_path)
    if not input_exists(source):
        raise BatchPathError(
            f"batch input {shown(source)} does not exist; give a JSONL file path or URL"
        )
    output = checked_location(output_path, "output")
    if (
        local_path(output) is None
        and is_url(source)
        and _writes(canonical_url(str(output)), canonical_url(str(source)))
    ):
        raise BatchPathError(
            f"input {shown(source)} is the output or a file the batch writes beside it; give "
            "the output another URL"
        )
    if server is not None or launch is None:
        server_names(server)  # an empty or repeated name fails before anything is opened
    if isinstance(launch, str) and not launch.strip():
        raise ConfigurationError("launch is an empty name: name a llama.cpp Launch block")
    gateway = pushgateway(run.pushgateway)  # a bad LLAMACPP_PUSHGATEWAY_URL fails here
    lines, embedding_lines = _count_lines(source)
    if selected is not None:  # about its share: ids are spread evenly by their hash
        lines, embedding_lines = -(-lines // selected.count), -(-embedding_lines // selected.count)
    return _Job(
        source,
        output,
        local_path(output),
        server,
        request,
        run,
        output_format,
        lines,
        embedding_lines,
        selected,
        launch,
        gateway,
    )


def _count_lines(source: str | Path) -> tuple[int, int]:
    """(lines, embedding lines) of the input, for the progress total and the embeddings gate.
    A local file is read through; an object is sampled (`URL_SAMPLE_BYTES`) and its lines
    estimated from its size, so a large one is not downloaded before the first request."""
    if local_path(source) is not None:
        lines, embedding_lines, _ = scan_input(source)
        return lines, embedding_lines
    sample = sample_input(source, limit_bytes=URL_SAMPLE_BYTES)
    if sample.whole:
        return sample.lines, sample.embedding_lines
    lines = round(input_size(source) * sample.lines / sample.bytes_read)
    if sample.embedding_lines and not sample.other_lines:
        return lines, lines  # embedding lines only, as far as the sample shows
    return lines, sample.embedding_lines


def _writes(output: str, location: str) -> bool:
    """Whether a run on the `output` URL writes `location` (the output, its parts, its files)."""
    return location == output or location.startswith(output + ".")


async def _open_published(
    job: _Job, closing: contextlib.AsyncExitStack, logger
) -> PublishedLedger | None:
    """For an object-storage output: take its lease (held until the run has joined its parts),
    then rebuild the local ledger from what is published. None for a local output."""
    if job.target is not None:
        return None
    if not PREFECT_API_URL.value():
        logger.warning(
            "No PREFECT_API_URL: the lease on %s lives in this process's own Prefect API, which "
            "runs on other machines cannot see; point every worker at one Prefect server",
            shown(job.output),
        )
    await closing.enter_async_context(output_lease(str(job.output), job.run.lease_seconds))
    published = PublishedLedger(str(job.output))
    parts = await asyncio.to_thread(published.restore)
    if parts:
        logger.info("Resuming %s from its %d published parts", shown(job.output), parts)
    return published


async def _open_fleet(
    job: _Job,
    ledger: Ledger,
    closing: contextlib.AsyncExitStack,
    logger,
    launched: FleetMember | None = None,
) -> tuple[list[Lane], BatchSummary, BatchOptions]:
    """Gate the servers (the named ones and the one this run started), open a lane for each
    (pending for those not ready yet), check the embedding servers and the ledger's settings:
    everything that may refuse the run before a line is sent."""
    request, run, server = job.request, job.run, job.server
    named = await resolve_servers(server) if server is not None or launched is None else []
    members = await gate_fleet(named + ([launched] if launched else []), run.ready_timeout)
    # Servers not ready now join the run when they are (pending lanes, watched).
    lanes = [
        Lane.for_server(
            member.label,
            member.block.settings(),
            member.status if member.skipped is None else None,
            concurrency=run.concurrency,
            queue_depth=run.queue_depth,
            request_timeout=run.request_timeout,
        )
        for member in members
        if member.skipped is None or member.may_join
    ]
    for lane in lanes:  # closed whatever fails before the runner owns them (twice is fine)
        closing.push_async_callback(lane.aclose)
    ready = [lane for lane in lanes if not lane.pending]
    if job.embeds:
        # An embeddings run (or a file of embedding lines only) stops here when no server
        # serves them; in a mixed file the chat lines still run.
        await _gate_embeddings(
            ready,
            logger,
            must=request.embeddings or job.embedding_lines >= job.lines,
            waiting=[lane.name for lane in lanes if lane.pending],
        )
    options = BatchOptions(
        concurrency=sum(lane.capacity for lane in ready),
        request=request,
        run=run,
        vector_encoding="float" if job.output_format == "openai" else None,
        keep_responses=job.output_format == "openai",
    )
    # A fleet's answers come from whichever server is free, and its members come and go
    # between runs: lines pin a model by naming it, so the run's settings name none.
    model = ready[0].model if not job.fleet else "(fleet)"
    summary = BatchSummary(
        input_path=shown(job.source),
        output_path=shown(job.output),
        server=",".join(member.label for member in members),
        base_url=",".join(lane.settings.server_url.openai_base for lane in lanes),
        model=model,
        concurrency=options.concurrency,
        output_format=job.output_format,
        ledger_unreadable_lines=ledger.state.unreadable_lines,
        skipped_servers={m.label: m.skipped for m in members if m.skipped},
    )
    summary.settings_changed = ledger.check_settings(
        request.run_settings(model), allow_change=run.allow_settings_change
    )
    logger.info(
        "Batch %s -> %s on %s (%s; %d in flight)",
        shown(job.source),
        shown(job.output),
        ", ".join(f"{lane.name}: {lane.capacity}" for lane in ready),
        summary.model,
        options.concurrency,
    )
    _log_ledger_repairs(logger, ledger, shown(job.output))
    return lanes, summary, options


async def _run(
    job: _Job,
    lanes: list[Lane],
    summary: BatchSummary,
    options: BatchOptions,
    ledger: Ledger,
    progress: BatchProgress,
    logger,
    published: PublishedLedger | None = None,
    private: set[str] = frozenset(),
) -> None:
    """Run the pending lines in chunks, then report: the summary artifact and the last progress.
    An abort is an outcome in `summary`; anything else unexpected is raised after the report.
    An object-storage output is published at checkpoints and joined at the end."""
    started = time.monotonic()
    checkpoints = _Checkpoints(ledger, published, job.run.checkpoint_seconds, logger)
    done_earlier = progress.finished

    def figures(ended: bool) -> BatchFigures:
        # Until the summary is filled at the end, item failures are the runner's own count.
        failed = Counter(summary.failed_by_kind)
        if not ended:
            failed.update(runner.stats.failed)
        lanes = runner.lanes
        return BatchFigures(
            batch=job.run.metrics_name or _file_name(job.output),
            shard=str(job.shard or ""),
            lines=job.lines,
            succeeded=runner.stats.succeeded,
            failed=dict(failed),
            done_earlier=done_earlier,
            in_flight=runner.in_flight,
            servers_in=sum(lane.up and not lane.pending and not lane.retired for lane in lanes),
            servers_out=sum(not (lane.up and not lane.pending) or lane.retired for lane in lanes),
            completion_tokens=runner.stats.completion_tokens,
            completion_tokens_per_s=round(
                runner.stats.completion_tokens / max(time.monotonic() - started, 1e-3), 2
            ),
            finished=ended,
        )

    telemetry = BatchTelemetry(figures, job.gateway)

    def finished(results: list[ResultLine]) -> None:
        ledger.write_all(results)
        failed = sum(result["error"] is not None for result in results)
        progress.advance(len(results), failed=failed)
        telemetry.tick()

    runner = BatchRunner(
        lanes,
        summary.model,
        options,
        on_results=finished,
        already_done=ledger.succeeded.__contains__,
    )
    runner.names_servers = job.fleet
    runner.checks_embeddings = job.embeds
    broker = None
    # Shared servers only: one this run started is its own. No API: nobody to share with.
    shared = [lane for lane in runner.lanes if lane.name not in private]
    if job.run.broker and shared and PREFECT_API_URL.value():
        broker = SlotBroker(
            shared,
            runner.dispatch,
            queue_depth=job.run.queue_depth,
            priority=job.run.priority,
        )
    pending = _pending_items(
        InputReader(job.source, embeddings=job.request.embeddings, shard=job.shard),
        ledger,
        runner.settings_fp,
        summary,
        progress,
    )
    ended = False  # the run ended (done or aborted), not broken off by an unexpected fault
    telemetry.start()
    try:
        try:
            if broker is not None:
                await broker.start()
            await _run_chunks(pending, job.run.chunk_size, runner, summary, checkpoints)
        except (BatchAbortedError, ExceptionGroup) as exc:
            summary.outcome = "aborted"
            summary.abort_reason = str(_first_cause(exc))
        ended = True
    finally:
        await telemetry.close()
        if broker is not None:
            await broker.aclose()
        await runner.aclose()
        await checkpoints.close(join=ended)
        summary.throughput = telemetry.throughput()  # before the summary counts failures
        _fill_summary(summary, runner, time.monotonic() - started)
        if ledger.errors_path is not None and ledger.errors_path.exists():
            summary.errors_path = published.errors_url if published else str(ledger.errors_path)
        if not ended:
            await _report(logger, progress.finish())
    # The last progress figure and the summary: two API calls, sent together.
    await _report(
        logger,
        progress.finish(),
        telemetry.finish(),
        acreate_markdown_artifact(
            markdown=render_summary(summary),
            key="llamacpp-batch-summary",
            description=f"llama.cpp batch: {summary.succeeded} succeeded, {summary.failed} failed",
        ),
    )


def _throughput_row(throughput: list[float]) -> list[tuple[str, str]]:
    if len(throughput) < 2:
        return []  # a run of a few seconds: nothing to draw
    chart = f"`{sparkline(throughput)}` (peak {max(throughput):g}, low {min(throughput):g})"
    return [("Lines answered per second over the run", chart)]


def _file_name(output: str | Path) -> str:
    """The last part of a path or URL (no query, no credentials): a batch's default name in
    metrics."""
    return re.split(r"[/\\]", shown(output).rstrip("/\\"))[-1] or "batch"


def log_outcome(logger, summary: BatchSummary) -> None:
    logger.info(
        "Batch %s: %d succeeded, %d failed, %d already done; %d completion tokens at %.1f tok/s",
        summary.outcome,
        summary.succeeded,
        summary.failed,
        summary.skipped_done,
        summary.completion_tokens,
        summary.completion_tokens_per_s,
    )


async def _gate_embeddings(
    lanes: list[Lane], logger, *, must: bool, waiting: list[str] | None = None
) -> None:
    """Ask every server whether it serves /v1/embeddings, and gives a text the same vector in a
    shared request as alone, before any line is sent: embedding lines go only to those that do.
    With none, the run stops here saying which flag is missing (`must`), or goes on with a
    warning and the embedding lines get `no_server_for_model`; while servers not ready yet
    (`waiting`) may join, embedding lines wait for them instead."""

    async def check(lane: Lane) -> NotSupportedError | str | None:
        try:
            problem = await packed_embeddings_problem(lane.gate, lane.model)
        except NotSupportedError as exc:
            return exc
        lane.embeddings = problem is None
        return problem

    problems = await asyncio.gather(*(check(lane) for lane in lanes))
    refused = {lane.name: why for lane, why in zip(lanes, problems, strict=True) if why}
    reasons = "; ".join(f"{name}: {why}" for name, why in refused.items())
    if len(refused) == len(lanes) and waiting:
        logger.warning(
            "No ready server serves embeddings (%s); embedding lines wait for %s",
            reasons,
            ", ".join(waiting),
        )
        return
    if len(refused) == len(lanes) and must:
        message = (
            f"the input asks for embeddings but no server of this run can serve them: {reasons}"
        )
        http = next((why for why in refused.values() if isinstance(why, NotSupportedError)), None)
        if http is None:
            raise BatchAbortedError(message + ". No line was sent.")
        raise NotSupportedError(
            message, status_code=http.status_code, url=http.url, server_message=http.server_message
        )
    if len(refused) == len(lanes):
        logger.warning("No server serves embeddings; the embedding lines fail: %s", reasons)
    elif refused:
        logger.warning("Embedding lines go only to the servers that serve them: %s", reasons)


def _log_ledger_repairs(logger, ledger: Ledger, target: str) -> None:
    state = ledger.state
    if state.dropped_partial_line:
        logger.warning("Dropped a half-written last line in %s (a crash mid-write).", target)
    if state.kept_unterminated_line:
        logger.info("Kept a complete last line of %s that had no newline.", target)
    if state.unreadable_lines:
        logger.warning(
            "%d lines of %s are not result lines and were skipped (edited by hand?).",
            state.unreadable_lines,
            target,
        )
    if ledger.legacy_lines:
        logger.warning(
            "%d answers in %s carry no fingerprint (an older version wrote them); they count as "
            "done without being checked against the input.",
            ledger.legacy_lines,
            target,
        )


async def _report(logger, *calls) -> None:
    """Send artifact calls together and wait for all of them. Artifacts report a run: a Prefect
    API that refuses one is logged, and the run's own outcome (its ledger, its abort) stands."""
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(outcome, Exception):
            logger.warning("A batch artifact could not be saved: %s", outcome)
        elif isinstance(outcome, BaseException):
            raise outcome


def _pending_items(
    reader: InputReader, ledger: Ledger, settings_fp: str, summary: BatchSummary, progress
):
    """Input items still to run. Input errors and changed requests get an error line (once);
    ids already answered for the same request are skipped."""
    state = ledger.state
    for entry in reader:
        if isinstance(entry, InputError):
            _count(summary, entry.kind)
            if (entry.custom_id, entry.line) not in state.written_input_errors:
                ledger.write(
                    result_line(entry.custom_id, entry.line, error=(entry.kind, entry.message))
                )
            progress.advance(failed=1)
            continue
        done = ledger.is_done(entry.custom_id, entry.input_fp)
        if done:
            summary.skipped_done += 1
        elif done is False:
            _count(summary, "ledger_mismatch")
            if (entry.custom_id, entry.input_fp) not in state.written_mismatches:
                ledger.write(
                    result_line(
                        entry.custom_id,
                        entry.line,
                        error=(
                            "ledger_mismatch",
                            f"line {entry.line}: {summary.output_path} already holds an answer for "
                            f"custom_id {entry.custom_id!r} to a different request (the line "
                            "changed since); give the line a new custom_id or use a new output "
                            "file",
                        ),
                        input_fp=entry.input_fp,
                        settings_fp=settings_fp,
                    )
                )
            progress.advance(failed=1)
        else:
            yield entry


def _count(summary: BatchSummary, kind: str) -> None:
    summary.failed_by_kind[kind] = summary.failed_by_kind.get(kind, 0) + 1


class _Checkpoints:
    """Where a run's lines become durable: the local ledger synced at each chunk's end and, for
    an object-storage output, the new lines published as a part then and every `interval`
    seconds (so a slow chunk loses no more than that); joined into the output at the end.
    Publishing runs beside the run, never holding the next chunk back; a publish that fails
    stops the run at the next chunk's end (or at its end), and nothing is published after."""

    def __init__(self, ledger: Ledger, published: PublishedLedger | None, interval, logger):
        self._ledger, self._published, self._logger = ledger, published, logger
        self._publishing: asyncio.Task | None = None
        self._again = False  # lines came while a publish ran: publish once more after it
        self._fault: BaseException | None = None
        self._timer = asyncio.create_task(self._every(interval)) if published is not None else None

    async def chunk_ended(self) -> None:
        self._ledger.sync()
        if self._published is not None:
            if self._fault is not None:
                raise self._fault
            self._publish_soon()

    async def _every(self, interval: float) -> None:
        while self._fault is None:
            await asyncio.sleep(interval)
            self._publish_soon()

    def _publish_soon(self) -> None:
        if self._fault is not None:
            return
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self._publish())
        else:
            self._again = True

    async def _publish(self) -> None:
        try:
            while True:
                self._again = False
                await self._published.publish()
                if not self._again:
                    return
        except Exception as exc:
            self._fault = exc
            self._logger.warning("Publishing the results failed: %s", exc)

    async def close(self, *, join: bool) -> None:
        """Sync; publish what is left and, when the run ended, join the output. A publish that
        failed is raised here when the run ended; else the run's own fault stands."""
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        self._ledger.sync()
        if self._published is None:
            return
        if self._publishing is not None:
            await asyncio.gather(self._publishing, return_exceptions=True)
        if self._fault is not None:
            if join:
                raise self._fault
            return
        if join:
            await self._published.join(self._ledger)
            return
        try:  # a run broken off by another fault keeps what it finished
            await self._published.publish()
        except Exception as exc:
            self._logger.warning("The last results could not be published: %s", exc)


async def _run_chunks(
    items: Iterator[BatchItem], chunk_size, runner, summary, checkpoints: _Checkpoints
) -> None:
    in_flight: set[asyncio.Task] = set()
    chunks = _chunked(items, chunk_size, runner.options.run.embedding_batch)
    try:
        for number, chunk in enumerate(chunks, start=1):
            if len(in_flight) >= CHUNKS_IN_FLIGHT:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                await checkpoints.chunk_ended()  # its lines on disk (and being published)
                faults = [task.exception() for task in done]  # each retrieved, none left unseen
                for fault in faults:
                    if fault is not None:
                        raise fault  # an aborted chunk stops the run now
            # quote(): Prefect would otherwise walk every item of every chunk looking for task
            # inputs: the largest Prefect cost of a run (docs/benchmarks.md).
            in_flight.add(asyncio.create_task(run_chunk(number, quote(chunk), runner)))
            summary.chunks = number
        while in_flight:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            await checkpoints.chunk_ended()
            faults = [task.exception() for task in done]
            for fault in faults:
                if fault is not None:
                    raise fault
    finally:
        for pending in in_flight:
            pending.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


def _chunked(
    items: Iterator[BatchItem], size: int, embedding_batch: int
) -> Iterator[list[BatchItem]]:
    """Chunks of `size` requests. A chat line is one request; embedding lines are packed
    `embedding_batch` texts to a request, so they count that way (a chunk of embedding lines
    ends on a full pack): 5,000 one-text lines are one task run, not ten, since every task run
    costs Prefect CPU. Embedding texts held by one chunk stay under `CHUNK_TEXT_CHARS`, so
    memory stays bounded."""
    chunk: list[BatchItem] = []
    requests, texts, chars = 0, 0, 0
    for item in items:
        chunk.append(item)
        if item.inputs is None:
            requests += 1
        else:
            texts += len(item.inputs)
            chars += sum(map(len, item.inputs))
        if requests + texts / embedding_batch >= size or chars >= CHUNK_TEXT_CHARS:
            yield chunk
            chunk = []
            requests, texts, chars = 0, 0, 0
    if chunk:
        yield chunk


def _first_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _fill_summary(summary: BatchSummary, runner: BatchRunner, wall_time: float) -> None:
    stats = runner.stats
    summary.succeeded = stats.succeeded
    for kind, count in stats.failed.items():
        summary.failed_by_kind[kind] = summary.failed_by_kind.get(kind, 0) + count
    summary.failed = sum(summary.failed_by_kind.values())
    summary.retries = stats.retries
    summary.server_waits = stats.server_waits
    summary.crashes_seen = stats.crashes_seen
    summary.prompt_tokens = stats.prompt_tokens
    summary.completion_tokens = stats.completion_tokens
    summary.wall_time_s = round(wall_time, 3)
    summary.completion_tokens_per_s = (
        round(stats.completion_tokens / wall_time, 2) if wall_time else 0
    )
    summary.max_in_flight = runner.max_in_flight
    summary.servers = [
        ServerShare(
            server=lane.name,
            capacity=lane.capacity,
            succeeded=lane.stats.succeeded,
            failed=lane.stats.failed,
            completion_tokens_per_s=round(lane.stats.completion_tokens / wall_time, 2)
            if wall_time
            else 0,
            taken_out=lane.stats.taken_out,
            rejoined=lane.stats.rejoined,
            joined_late=lane.stats.joined_late,
        )
        for lane in runner.lanes
    ]


def render_summary(summary: BatchSummary) -> str:
    rows = [
        ("Outcome", f"**{summary.outcome}**"),
        ("Server", f"{summary.server} ({summary.base_url})"),
        ("Model", summary.model),
        ("Succeeded", summary.succeeded),
        ("Failed", summary.failed),
        ("Already done (skipped)", summary.skipped_done),
        ("Prompt / completion tokens", f"{summary.prompt_tokens} / {summary.completion_tokens}"),
        ("Completion tokens/s", summary.completion_tokens_per_s),
        *_throughput_row(summary.throughput),
        ("Wall time (s)", summary.wall_time_s),
        ("Concurrency (max seen in flight)", f"{summary.concurrency} ({summary.max_in_flight})"),
        ("Chunks (task runs)", summary.chunks),
        ("Transient retries / waits for the server", f"{summary.retries} / {summary.server_waits}"),
        ("Requests dropped by a server crash", summary.crashes_seen),
        ("Output", summary.output_path),
    ]
    if summary.output_format != "native":
        rows.append(("Output format", summary.output_format))
    if summary.errors_path:
        rows.append(("Failed lines (errors file)", summary.errors_path))
    if summary.ledger_unreadable_lines:
        rows.append(("Unreadable ledger lines (skipped)", summary.ledger_unreadable_lines))
    if summary.settings_changed:
        rows.append(("Settings changed (allowed)", ", ".join(summary.settings_changed)))
    for name, why in summary.skipped_servers.items():
        rows.append((f"Skipped server {name}", why))
    if len(summary.servers) > 1:
        rows += [
            (
                f"Server {share.server}",
                f"{share.succeeded} done, {share.failed} failed, "
                f"{share.completion_tokens_per_s} tok/s, {share.capacity} in flight, "
                f"out {share.taken_out}x, rejoined {share.rejoined}x"
                + (", joined late" if share.joined_late else ""),
            )
            for share in summary.servers
        ]
    rows += [
        (
            f"Shard {share.shard}",
            f"{share.succeeded} done, {share.failed} failed, {share.skipped_done} done earlier, "
            f"{share.completion_tokens_per_s} tok/s; run {share.flow_run} "
            f"({share.attempts} run{'s' if share.attempts > 1 else ''})",
        )
        for share in summary.shards
    ]
    rows += [(f"Failed: {kind}", count) for kind, count in sorted(summary.failed_by_kind.items())]
    if summary.abort_reason:
        rows.append(("Aborted because", summary.abort_reason))
    return markdown_table("llama.cpp batch", rows)


class BatchCommand(BaseModel):
    """Run a JSONL file of prompts through a llama.cpp server; resumable. Every option of
    `RequestOptions` and `RunOptions` is a flag (`--max-tokens`, or `--request.max-tokens`)."""

    # The short form of each option: --max-tokens for --request.max-tokens.
    model_config = cli_config(
        "llamacpp-batch",
        {f"{group}.{name}": name for group, name in option_names()} | {"schema_file": "schema"},
    )

    input_path: CliPositionalArg[str] = Field(description="JSONL file of prompts")
    output_path: CliPositionalArg[str] = Field(
        description="JSONL results file (appended; rerun to resume)"
    )
    server: list[str] = Field(
        default_factory=list,
        description="llama.cpp Server block name; repeat it for a fleet (default: the block "
        "'llamacpp', else the LLAMACPP_* settings)",
    )
    schema_file: Path | None = Field(
        None, description="JSON Schema file: answers become objects (sets output_schema)"
    )
    output_format: OutputFormat = Field(
        "native",
        description="openai: OpenAI Batch output lines, failed ones also in <output>.errors.jsonl",
    )
    storage: str | None = Field(
        None,
        description="Storage block for the input and output URLs' credentials: "
        "remote-file-system/NAME or s3-bucket/NAME; paths are read under its base URL",
    )
    launch: str | None = Field(
        None,
        description="llama.cpp Launch block name: start a llama-server for this run on this "
        "machine (beside any --server)",
    )
    launch_model: str | None = Field(
        None,
        description="GGUF path or URL: start a llama-server with it for this run, with the "
        "default launch options (instead of --launch)",
    )
    request: RequestOptions = RequestOptions()
    run: RunOptions = RunOptions()

    @field_validator("input_path", "output_path")
    @classmethod
    def _usable(cls, location: str, info) -> str:
        # Refused here, a URL carrying credentials never reaches the flow run's parameters.
        checked_location(location, info.field_name.removesuffix("_path"))
        return location

    @field_validator("server")
    @classmethod
    def _usable_names(cls, names: list[str]) -> list[str]:
        if names:
            server_names(names)  # an empty or repeated name: refused before anything starts
        return names

    def flow_parameters(self) -> dict[str, Any]:
        """The flow's parameters, as the command line gave them."""
        request = self.request
        if self.schema_file is not None:
            try:
                schema = json.loads(self.schema_file.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"--schema-file {self.schema_file}: {exc}") from None
            try:
                request = RequestOptions(**{**request.model_dump(), "output_schema": schema})
            except ValidationError as exc:
                problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise ConfigurationError(f"--schema-file {self.schema_file}: {problem}") from None
        return {
            "input_path": self.input_path,
            "output_path": self.output_path,
            "server": self.server[0] if len(self.server) == 1 else (self.server or None),
            "request": request,
            "run": self.run,
            "output_format": self.output_format,
            "storage": self.storage,
            "launch": self._launch(),
        }

    def _launch(self) -> LaunchSpec | str | None:
        if self.launch and self.launch_model:
            raise ConfigurationError("give --launch (a block) or --launch-model (a file), not both")
        return LaunchSpec(model=self.launch_model) if self.launch_model else self.launch


def main(argv: list[str] | None = None) -> int:
    try:
        command = CliApp.run(BatchCommand, cli_args=sys.argv[1:] if argv is None else argv)
        parameters = command.flow_parameters()
    except (ValidationError, OSError, ValueError) as exc:
        print(f"llamacpp-batch: {cli_problem(exc)}", file=sys.stderr)
        return 2

    async def run() -> int:
        state = await llamacpp_batch_flow(**parameters, return_state=True)
        if state.is_failed():
            print(f"batch failed: {state.message}", file=sys.stderr)
            return 1
        summary = await state.aresult()
        print(json.dumps(summary.model_dump(), indent=2))
        return 0

    return run_cli(lambda: asyncio.run(run()))


if __name__ == "__main__":
    sys.exit(main())
