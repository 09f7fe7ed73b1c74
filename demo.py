"""`make demo`: a batch that starts its own llama-server, a rerun that resumes, and the health flow.

Builds or reuses `llama-server`, writes a tiny random-weight model (its answers are noise; the
point is the plumbing), saves a `llama.cpp Launch` block in your local Prefect database, runs
`examples/prompts.jsonl` through a server the batch starts and stops itself (`launch=`), reruns
it to show it resumes, then starts a server with `llamacpp_server` for the health flow.
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
from prefect_llamacpp.blocks import LlamaCppLaunch, LlamaCppServer
from prefect_llamacpp.flows.batch import llamacpp_batch_flow
from prefect_llamacpp.flows.health import llamacpp_health_flow
from prefect_llamacpp.flows.local_api import run_cli
from prefect_llamacpp.managed import llamacpp_server

REPO = Path(__file__).resolve().parent
LAUNCH_BLOCK = "llamacpp-demo-launch"
SERVER_BLOCK = "llamacpp-demo"
PROMPTS = REPO / "examples" / "prompts.jsonl"
RESULTS = REPO / "out" / "demo-results.jsonl"


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


async def run(launch: LlamaCppLaunch) -> None:
    say(f"Saving block {LAUNCH_BLOCK!r}: {launch.model_id}, {launch.parallel} slots")
    await launch.save(LAUNCH_BLOCK, overwrite=True)

    say(f"Batch with launch={LAUNCH_BLOCK!r}: {PROMPTS.relative_to(REPO)} -> out/")
    RESULTS.unlink(missing_ok=True)
    summary = await llamacpp_batch_flow(
        str(PROMPTS), str(RESULTS), launch=LAUNCH_BLOCK, request={"max_tokens": 48}
    )
    print(
        f"{summary.succeeded} succeeded, {summary.failed} failed {summary.failed_by_kind}, "
        f"{summary.completion_tokens} completion tokens at {summary.completion_tokens_per_s} tok/s "
        f"in {summary.wall_time_s} s on {summary.server}, {summary.max_in_flight} requests in "
        "flight at most; the server is stopped"
    )
    print("A few results (random weights: the text is noise, the structure is not):")
    for line in RESULTS.read_text().splitlines()[:3] + RESULTS.read_text().splitlines()[-2:]:
        record = json.loads(line)
        shown = json.dumps(record["output"], ensure_ascii=True)[:70] if record["output"] else None
        print(f"  {record['custom_id']:>16}  output={shown}  error={record['error']}")

    say("Batch again: the output file is the ledger, so nothing is redone")
    again = await llamacpp_batch_flow(
        str(PROMPTS), str(RESULTS), launch=LAUNCH_BLOCK, request={"max_tokens": 48}
    )
    print(f"{again.skipped_done} already done, {again.succeeded} new requests")

    say("Health flow, on a server started with llamacpp_server() and saved as a block")
    async with llamacpp_server(launch.spec()) as server:
        await LlamaCppServer(base_url=server.base_url, timeout=10).save(
            SERVER_BLOCK, overwrite=True
        )
        status = (await llamacpp_health_flow(SERVER_BLOCK)).status
        print(
            f"state={status.state} model={status.model_id} build={status.build_info} "
            f"slots={status.total_slots} n_ctx/slot={status.n_ctx} (pid {server.pid})"
        )


def main() -> int:
    say("llama-server binary (built once and cached if none is found)")
    binary = ensure_llama_server()
    print(binary)
    launch = LlamaCppLaunch(
        binary=str(binary), model=str(ensure_model("tiny")), alias="demo-tiny", ctx_size=4096
    )
    code = run_cli(lambda: asyncio.run(run(launch)) or 0)
    if code:
        return code
    say("Every server stopped. Demo done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
