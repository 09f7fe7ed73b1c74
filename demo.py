"""`make demo`: a local llama-server, a saved block, the health flow and a small batch, end to end.

Builds or reuses `llama-server`, writes a tiny random-weight model (its answers are noise; the
point is the plumbing), starts the server on a free 127.0.0.1 port, saves a `llama.cpp Server`
block in your local Prefect database, runs the health flow and a batch of `examples/prompts.jsonl`,
reruns the batch to show it resumes, prints what happened, and stops the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "prefect_llamacpp")

from harness.binary import ensure_llama_server
from harness.models import ensure_model
from harness.server import LlamaServer
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from prefect_llamacpp.flows.health import llamacpp_health_flow
from prefect_llamacpp.flows.local_api import run_cli

REPO = Path(__file__).resolve().parent
BLOCK_NAME = "llamacpp-demo"
PROMPTS = REPO / "examples" / "prompts.jsonl"
RESULTS = REPO / "out" / "demo-results.jsonl"


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


async def run(server: LlamaServer) -> None:
    say(f"Saving block {BLOCK_NAME!r} -> {server.openai_base}")
    await LlamaCppServer(base_url=server.openai_base, timeout=10).save(BLOCK_NAME, overwrite=True)

    say("Health flow")
    status = (await llamacpp_health_flow(BLOCK_NAME)).status
    print(
        f"state={status.state} model={status.model_id} build={status.build_info} "
        f"slots={status.total_slots} n_ctx/slot={status.n_ctx}"
    )

    say(f"Batch: {PROMPTS.relative_to(REPO)} -> {RESULTS.relative_to(REPO)}")
    RESULTS.unlink(missing_ok=True)
    summary = await llamacpp_batch_flow(
        str(PROMPTS), str(RESULTS), server=BLOCK_NAME, request={"max_tokens": 48}
    )
    print(
        f"{summary.succeeded} succeeded, {summary.failed} failed {summary.failed_by_kind}, "
        f"{summary.completion_tokens} completion tokens at {summary.completion_tokens_per_s} tok/s "
        f"in {summary.wall_time_s} s, {summary.chunks} chunk task(s), "
        f"{summary.max_in_flight} requests in flight at most"
    )
    print("A few results (random weights: the text is noise, the structure is not):")
    for line in RESULTS.read_text().splitlines()[:3] + RESULTS.read_text().splitlines()[-2:]:
        record = json.loads(line)
        shown = json.dumps(record["output"], ensure_ascii=True)[:70] if record["output"] else None
        print(f"  {record['custom_id']:>16}  output={shown}  error={record['error']}")

    say("Batch again: the output file is the ledger, so nothing is redone")
    again = await llamacpp_batch_flow(
        str(PROMPTS), str(RESULTS), server=BLOCK_NAME, request={"max_tokens": 48}
    )
    print(f"{again.skipped_done} already done, {again.succeeded} new requests")


def main() -> int:
    say("llama-server binary (built once and cached if none is found)")
    binary = ensure_llama_server()
    print(binary)
    model = ensure_model("tiny")
    say(f"Starting llama-server with {model.name}")
    with LlamaServer(
        model, ["-np", "4", "-c", "4096", "--alias", "demo-tiny", "--metrics"]
    ) as server:
        print(f"listening on {server.url} (pid {server.process.pid})")
        code = run_cli(lambda: asyncio.run(run(server)) or 0)
    if code:
        return code
    say("Server stopped. Demo done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
