"""The batch inference flow: JSONL prompts through a llama-server, resumable, losing nothing.

    python -m flows.batch prompts.jsonl results.jsonl --server my-llama --max-tokens 256

Gate first (wait through loading, check the key, detect the model), then stream the input in
chunks; each chunk is one Prefect task whose prompts run concurrently, at most `concurrency`
(default: the server's `total_slots`) in flight across the whole run. Results are appended to the
output file as they finish; a rerun skips what already succeeded. See the README for the formats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.llamacpp import DEFAULT_BLOCK_NAME
from flows.batch_progress import BatchProgress
from flows.report import markdown_table
from src.core.batch.jsonl_input import BatchItem, InputError, InputReader, count_lines
from src.core.batch.ledger import LedgerWriter, read_ledger
from src.core.batch.runner import BatchAbortedError, BatchOptions, BatchRunner
from src.core.models.llamacpp_provider import DEFAULT_MODEL_NAME
from tasks.llamacpp import check_health, load_server_or_env, wait_until_ready

CHUNKS_IN_FLIGHT = 2  # the next chunk fills slots while the last prompts of this one finish


class BatchSummary(BaseModel):
    input_path: str
    output_path: str
    server: str
    base_url: str
    model: str
    concurrency: int
    outcome: str = "completed"  # or "aborted"
    succeeded: int = 0
    failed: int = 0
    failed_by_kind: dict[str, int] = Field(default_factory=dict)
    skipped_done: int = 0
    retries: int = 0
    server_waits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_time_s: float = 0.0
    completion_tokens_per_s: float = 0.0
    chunks: int = 0
    max_in_flight: int = 0
    abort_reason: str | None = None


@task(
    name="llama.cpp batch chunk",
    description="Run one chunk of batch prompts concurrently; results go to the output ledger.",
    task_run_name="chunk-{number}",
    cache_policy=NO_CACHE,  # a rerun must ask the server, never replay a stored answer
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
    server: str = DEFAULT_BLOCK_NAME,
    system_prompt: str | None = None,
    output_schema: dict[str, Any] | None = None,
    max_tokens: int | None = 512,
    temperature: float | None = None,
    concurrency: int | None = None,
    ready_timeout: float = 300,
    chunk_size: int = 100,
    max_attempts: int = 3,
    request_timeout: float = 600,
    extra_body: dict[str, Any] | None = None,
) -> BatchSummary:
    """Run every line of `input_path` through the server saved as block `server`.

    `output_schema` (a JSON Schema) makes every answer a validated object. `extra_body` adds
    llama-server sampling fields to every request (`{"top_k": 20, "min_p": 0.05}`). `concurrency`
    defaults to the server's `total_slots`. Fails before sending anything when the server is not
    ready within `ready_timeout` seconds or the key is wrong; fails mid-run, with every finished
    result saved, if the server goes away for longer than `ready_timeout`.
    """
    logger = get_run_logger()
    source, target = Path(input_path), Path(output_path)
    if not source.is_file():
        raise FileNotFoundError(f"batch input {source} does not exist; give a JSONL file path")
    if chunk_size < 1 or (concurrency is not None and concurrency < 1):
        raise ValueError("chunk_size and concurrency must be at least 1")

    block, label = await load_server_or_env(server)
    await wait_until_ready(block, timeout=ready_timeout)
    status = await check_health(block)
    if not status.is_ready:
        raise BatchAbortedError(
            f"llama-server {label} is {status.state}: {status.error} No prompt was sent."
        )
    model = block.model_name or status.model_id
    if status.metadata.get("role") == "router" and not model:
        raise BatchAbortedError(
            "llama-server runs in router mode with no model loaded: set model_name on the block."
        )
    slots = status.metadata.get("total_slots")
    options = BatchOptions(
        concurrency=concurrency or slots or 4,
        system_prompt=system_prompt,
        output_schema=output_schema,
        max_tokens=max_tokens,
        temperature=temperature,
        max_attempts=max_attempts,
        ready_timeout=ready_timeout,
        request_timeout=request_timeout,
        extra_body=extra_body,
    )
    summary = BatchSummary(
        input_path=str(source),
        output_path=str(target),
        server=label,
        base_url=status.base_url,
        model=model or DEFAULT_MODEL_NAME,
        concurrency=options.concurrency,
    )
    logger.info(
        "Batch %s -> %s on %s (%s, %s slots, %d in flight)",
        source,
        target,
        label,
        summary.model,
        slots or "?",
        options.concurrency,
    )

    ledger = read_ledger(target)
    if ledger.dropped_partial_line:
        logger.warning("Dropped a half-written last line in %s (a crash mid-write).", target)
    progress = await BatchProgress.start(count_lines(source), done=len(ledger.succeeded_ids))
    started = time.monotonic()
    with LedgerWriter(target) as writer:

        def finished(result: dict[str, Any]) -> None:
            writer.write(result)
            progress.advance(failed=result["error"] is not None)

        runner = BatchRunner(block.settings(), summary.model, options, on_result=finished)
        try:
            await _run_chunks(
                _pending_items(source, ledger, writer, summary, progress),
                chunk_size,
                runner,
                summary,
            )
        except (BatchAbortedError, ExceptionGroup) as exc:
            summary.outcome = "aborted"
            summary.abort_reason = str(_first_cause(exc))
        finally:
            await runner.aclose()
            writer.sync()
            _fill_summary(summary, runner, time.monotonic() - started)
            await progress.finish()

    await acreate_markdown_artifact(
        markdown=render_summary(summary),
        key="llamacpp-batch-summary",
        description=f"llama.cpp batch: {summary.succeeded} succeeded, {summary.failed} failed",
    )
    logger.info(
        "Batch %s: %d succeeded, %d failed, %d already done; %d completion tokens at %.1f tok/s",
        summary.outcome,
        summary.succeeded,
        summary.failed,
        summary.skipped_done,
        summary.completion_tokens,
        summary.completion_tokens_per_s,
    )
    if summary.outcome == "aborted":
        raise BatchAbortedError(summary.abort_reason or "batch aborted")
    return summary


def _pending_items(source, ledger, writer: LedgerWriter, summary: BatchSummary, progress):
    """Input items still to run; input errors are written (once) and already-done ids skipped."""
    for entry in InputReader(source):
        if isinstance(entry, InputError):
            summary.failed_by_kind[entry.kind] = summary.failed_by_kind.get(entry.kind, 0) + 1
            if entry.line not in ledger.input_error_lines:
                writer.write(
                    {
                        "custom_id": entry.custom_id,
                        "line": entry.line,
                        "output": None,
                        "error": {"kind": entry.kind, "message": entry.message},
                        "usage": None,
                        "model": None,
                        "latency_s": 0.0,
                        "attempts": 0,
                    }
                )
            progress.advance(failed=True)
        elif entry.custom_id in ledger.succeeded_ids:
            summary.skipped_done += 1
        else:
            yield entry


async def _run_chunks(items: Iterator[BatchItem], chunk_size, runner, summary) -> None:
    in_flight: set[asyncio.Task] = set()
    try:
        for number, chunk in enumerate(_chunked(items, chunk_size), start=1):
            if len(in_flight) >= CHUNKS_IN_FLIGHT:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for finished_chunk in done:
                    finished_chunk.result()  # re-raise an aborted chunk now
            in_flight.add(asyncio.create_task(run_chunk(number, chunk, runner)))
            summary.chunks = number
        for finished_chunk in asyncio.as_completed(in_flight):
            await finished_chunk
    finally:
        for pending in in_flight:
            pending.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


def _chunked(items: Iterator[BatchItem], size: int) -> Iterator[list[BatchItem]]:
    chunk: list[BatchItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
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
    summary.prompt_tokens = stats.prompt_tokens
    summary.completion_tokens = stats.completion_tokens
    summary.wall_time_s = round(wall_time, 3)
    summary.completion_tokens_per_s = (
        round(stats.completion_tokens / wall_time, 2) if wall_time else 0
    )
    summary.max_in_flight = runner.max_in_flight


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
        ("Wall time (s)", summary.wall_time_s),
        ("Concurrency (max seen in flight)", f"{summary.concurrency} ({summary.max_in_flight})"),
        ("Chunks (task runs)", summary.chunks),
        ("Transient retries / waits for the server", f"{summary.retries} / {summary.server_waits}"),
        ("Output", summary.output_path),
    ]
    rows += [(f"Failed: {kind}", count) for kind, count in sorted(summary.failed_by_kind.items())]
    if summary.abort_reason:
        rows.append(("Aborted because", summary.abort_reason))
    return markdown_table("llama.cpp batch", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.batch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("input", help="JSONL file of prompts")
    parser.add_argument("output", help="JSONL results file (appended; rerun to resume)")
    parser.add_argument("--server", default=DEFAULT_BLOCK_NAME, help="llama.cpp Server block name")
    parser.add_argument("--system-prompt")
    parser.add_argument("--schema", type=Path, help="JSON Schema file: answers become objects")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--concurrency", type=int, help="default: the server's total_slots")
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--chunk-size", type=int, default=100)
    args = parser.parse_args(argv)
    schema = json.loads(args.schema.read_text()) if args.schema else None

    async def run() -> int:
        state = await llamacpp_batch_flow(
            args.input,
            args.output,
            server=args.server,
            system_prompt=args.system_prompt,
            output_schema=schema,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            concurrency=args.concurrency,
            ready_timeout=args.ready_timeout,
            chunk_size=args.chunk_size,
            return_state=True,
        )
        if state.is_failed():
            print(f"batch failed: {state.message}", file=sys.stderr)
            return 1
        summary = await state.aresult()
        print(json.dumps(summary.model_dump(), indent=2))
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
