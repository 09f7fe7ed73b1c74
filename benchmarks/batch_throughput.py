"""`make bench`: the batch flow against a raw client, side by side, on real llama-servers.

Every figure is measured in this one run (the machine is shared and noisy, so only ratios taken
side by side mean anything). Same requests everywhere, fixed output length (`ignore_eos`).

1. flow / raw throughput (completion tokens/s), raw = httpx keeping `total_slots` in flight;
2. naive loop (one `Agent.run` after another) / raw;
3. flow at 4x `total_slots` concurrency / flow at `total_slots`;
4. peak RSS of a 50,000-line batch minus that of a 5,000-line batch;
5. Prefect task runs per 1,000 prompts;
6. short answers (tiny model, 8 tokens, 1,000 prompts): flow / raw requests per second, and
   the client CPU per request of the flow's process against the raw client's process (each runs
   in a process of its own, so its CPU time is its own), with the flow at queue depths 0, 1, 2;
7. a fleet of one (`server=[block]`) / the single-server flow, and, for two servers with
   different `-np`, each server's share of the items against its share of the slots;
8. embeddings per second: the flow (native `input` lines, packed) / raw httpx sending the same
   packs with `total_slots` in flight; the flow over its run, as the chat figures count it, and
   over the whole call (Prefect's per-run cost of about half a second included); each flow run
   against the raw runs either side of it, 8 rounds;
9. object storage: the same batch with its output on S3 (a moto server on loopback: parts
   published at every chunk's end, joined at the end) / to a local file, over the whole call,
   rounds alternating; and the peak RSS of the large batch of (4) with input and output on S3;
10. the capacity broker: one run alone with the broker on / off (short answers, where its cost
    would show most), whole calls, rounds alternating;
11. shards: the same batch (input and output on S3, a fleet of two servers) as 2 shards on two
    process workers of a real `prefect server start` / as one run, whole calls.

    python -m benchmarks.batch_throughput [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median

import httpx

from prefect_llamacpp.batch.options import DEFAULT_QUEUE_DEPTH

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SLOTS = 4
# Every request generates exactly max_tokens and processes its whole prompt (no KV reuse
# between rounds), so every run does the same work.
EXTRA = {"ignore_eos": True, "cache_prompt": False}


def prompts(count: int) -> list[str]:
    return [f"Request {i}: write a short story about the number {i}." for i in range(count)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"custom_id": f"r{i}", "prompt": text}) + "\n")
    return path


async def raw_throughput(url: str, texts: list[str], max_tokens: int, concurrency: int) -> float:
    """Completion tokens/s of plain httpx with `concurrency` requests in flight."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def one(text: str) -> None:
            nonlocal tokens
            async with gate:
                response = await http.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": text}],
                        "max_tokens": max_tokens,
                        **EXTRA,
                    },
                )
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.monotonic()
        await asyncio.gather(*(one(text) for text in texts))
        return tokens / (time.monotonic() - started)


async def flow_throughput(block: str, source: Path, max_tokens: int, concurrency=None) -> float:
    from prefect_llamacpp.flows.batch import llamacpp_batch_flow

    target = source.with_suffix(f".out-{time.monotonic_ns()}.jsonl")
    summary = await llamacpp_batch_flow(
        str(source),
        str(target),
        server=block,
        request={"max_tokens": max_tokens, "extra_body": EXTRA},
        run={"concurrency": concurrency},
    )
    assert summary.failed == 0, summary.failed_by_kind
    return summary.completion_tokens_per_s


async def naive_throughput(url: str, texts: list[str], max_tokens: int) -> float:
    """One `Agent.run` after another: what a first attempt usually looks like."""
    from pydantic_ai import Agent

    from prefect_llamacpp import create_llamacpp_model
    from prefect_llamacpp.config import LlamaCppSettings

    agent = Agent(create_llamacpp_model(settings=LlamaCppSettings(base_url=url)))
    tokens = 0
    started = time.monotonic()
    for text in texts:
        result = await agent.run(
            text, model_settings={"max_tokens": max_tokens, "extra_body": EXTRA}
        )
        tokens += result.usage.output_tokens
    return tokens / (time.monotonic() - started)


async def measure_model(
    model: str, requests: int, max_tokens: int, rounds: int, extra: bool, work: Path
):
    from harness.models import ensure_model
    from harness.server import LlamaServer
    from prefect_llamacpp.blocks import LlamaCppServer

    args = ["-np", str(SLOTS), "-c", str(SLOTS * 1024), "--alias", model]
    figures: dict[str, float] = {}
    with LlamaServer(ensure_model(model), args, log_dir=work) as server:
        block = f"bench-{model}"
        await LlamaCppServer(base_url=server.url).save(block, overwrite=True)
        texts = prompts(requests)
        source = write_jsonl(work / f"{model}.jsonl", texts)
        await raw_throughput(server.url, texts[: SLOTS * 2], max_tokens, SLOTS)  # warm-up
        await flow_throughput(block, source, max_tokens)  # warm-up: Prefect's first run costs more
        raws, flows, wides = [], [], []
        runs = [
            ("raw", raws, lambda: raw_throughput(server.url, texts, max_tokens, SLOTS)),
            ("flow", flows, lambda: flow_throughput(block, source, max_tokens)),
        ]
        if extra:
            runs.append(
                ("flow 4x", wides, lambda: flow_throughput(block, source, max_tokens, SLOTS * 4))
            )
        for round_number in range(rounds):
            # Interleaved, order alternating each round, so drift hits every side alike.
            for label, results, measure in runs if round_number % 2 == 0 else runs[::-1]:
                results.append(await measure())
                print(
                    f"[bench] {model} round {round_number + 1} {label}: {results[-1]:.1f} tok/s",
                    flush=True,
                )
        figures["raw"], figures["flow"] = mean(raws), mean(flows)
        figures["ratio"] = median(f / r for f, r in zip(flows, raws, strict=True))
        if extra:
            figures["wide"] = mean(wides)
            figures["wide_ratio"] = median(w / f for w, f in zip(wides, flows, strict=True))
            naive_texts = texts[: max(SLOTS * 2, requests // 4)]
            naive = await naive_throughput(server.url, naive_texts, max_tokens)
            raw_again = await raw_throughput(server.url, naive_texts, max_tokens, SLOTS)
            figures["naive"], figures["naive_ratio"] = naive, naive / raw_again
    return figures


SHORT_TOKENS = 8
QUEUE_DEPTHS = (0, 1, 2)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def short_child(kind: str, url: str, requests: int, work: Path) -> None:
    """One side of the short-answer bench in this process: a warm-up run, then measured runs.

    Prints one JSON line: requests/s and this process's CPU seconds per measured run.
    """
    texts = prompts(requests)
    source = write_jsonl(work / f"short-{kind}.jsonl", texts)
    os.environ["LLAMACPP_BASE_URL"] = url

    async def raw() -> None:
        await raw_throughput(url, texts, SHORT_TOKENS, SLOTS)

    def flow(depth: int):
        async def run() -> None:
            from prefect_llamacpp.flows.batch import llamacpp_batch_flow

            summary = await llamacpp_batch_flow(
                str(source),
                str(work / f"short-out-{time.monotonic_ns()}.jsonl"),
                request={"max_tokens": SHORT_TOKENS, "extra_body": EXTRA},
                run={"queue_depth": depth},
            )
            assert summary.failed == 0, summary.failed_by_kind

        return run

    runs = {"raw": raw} if kind == "raw" else {f"depth {d}": flow(d) for d in QUEUE_DEPTHS}
    asyncio.run(next(iter(runs.values()))())  # warm-up: imports, first flow run, connections
    figures = {}
    for label, run in runs.items():
        cpu, started = _cpu_seconds(), time.monotonic()
        asyncio.run(run())
        wall = time.monotonic() - started
        figures[label] = {"requests_per_s": requests / wall, "cpu_s": _cpu_seconds() - cpu}
    print(json.dumps(figures))


def measure_short_answers(requests: int, rounds: int, work: Path) -> dict[str, float]:
    from prefect.settings import PREFECT_API_URL

    from harness.models import ensure_model
    from harness.server import LlamaServer

    raws, flows, depths = [], [], {depth: [] for depth in QUEUE_DEPTHS}
    args = ["-np", str(SLOTS), "--alias", "tiny", "--cache-ram", "0"]
    with LlamaServer(ensure_model("tiny"), args, log_dir=work) as server:
        for round_number in range(rounds):
            order = ("raw", "flow") if round_number % 2 == 0 else ("flow", "raw")
            for kind in order:
                child = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.batch_throughput",
                        "--short-child",
                        kind,
                        server.url,
                        str(requests),
                        str(work),
                    ],
                    # The flow child reports to this run's Prefect API, not an ephemeral one of its own.
                    env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                if child.returncode != 0:
                    raise RuntimeError(child.stderr[-3000:])
                figures = json.loads(child.stdout.strip().splitlines()[-1])
                if kind == "raw":
                    raws.append(figures["raw"])
                else:
                    for depth in QUEUE_DEPTHS:
                        depths[depth].append(figures[f"depth {depth}"])
                    flows.append(figures[f"depth {DEFAULT_QUEUE_DEPTH}"])
                print(
                    f"[bench] short answers round {round_number + 1} {kind}: {figures}", flush=True
                )
    return {
        "raw_rps": mean(r["requests_per_s"] for r in raws),
        "flow_rps": mean(f["requests_per_s"] for f in flows),
        "ratio": median(
            f["requests_per_s"] / r["requests_per_s"] for f, r in zip(flows, raws, strict=True)
        ),
        "cpu_ratio": median(f["cpu_s"] / r["cpu_s"] for f, r in zip(flows, raws, strict=True)),
        "raw_cpu_ms": 1000 * mean(r["cpu_s"] for r in raws) / requests,
        "flow_cpu_ms": 1000 * mean(f["cpu_s"] for f in flows) / requests,
        **{
            f"depth_{depth}_rps": mean(f["requests_per_s"] for f in depths[depth])
            for depth in QUEUE_DEPTHS
        },
    }


async def measure_fleet(requests: int, rounds: int, work: Path) -> dict[str, float]:
    """Fleet of one vs the same block named alone; then two servers with 1 and 3 slots."""
    from harness.models import ensure_model
    from harness.server import LlamaServer
    from prefect_llamacpp.blocks import LlamaCppServer
    from prefect_llamacpp.flows.batch import llamacpp_batch_flow

    texts = prompts(requests)
    source = write_jsonl(work / "fleet.jsonl", texts)

    async def run(server) -> float:
        summary = await llamacpp_batch_flow(
            str(source),
            str(work / f"fleet-out-{time.monotonic_ns()}.jsonl"),
            server=server,
            request={"max_tokens": 32, "extra_body": EXTRA},
        )
        assert summary.failed == 0, summary.failed_by_kind
        return summary.completion_tokens_per_s

    figures: dict[str, float] = {}
    args = ["-np", str(SLOTS), "-c", str(SLOTS * 1024), "--alias", "tiny"]
    with LlamaServer(ensure_model("tiny"), args, log_dir=work) as server:
        await LlamaCppServer(base_url=server.url).save("bench-fleet", overwrite=True)
        await run("bench-fleet")  # warm-up
        ratios = []
        for round_number in range(rounds):
            sides = [("single", "bench-fleet"), ("fleet", ["bench-fleet"])]
            results = {}
            for label, server_param in sides if round_number % 2 == 0 else sides[::-1]:
                results[label] = await run(server_param)
            ratios.append(results["fleet"] / results["single"])
            print(f"[bench] fleet of one round {round_number + 1}: {results}", flush=True)
        figures["fleet_of_one_ratio"] = median(ratios)

    # Two servers of the 340 MB model, one thread each, so a step costs about the same for 1 or
    # 3 sequences and throughput follows the slots (see tests/flows/test_fleet.py).
    servers = [
        LlamaServer(
            ensure_model("bench"),
            ["-np", str(slots), "-c", str(512 * slots), "-t", "1", "--alias", f"bench-{slots}"],
            log_dir=work,
        )
        for slots in (1, 3)
    ]
    try:
        names = []
        for server, slots in zip(servers, (1, 3), strict=True):
            server.start()
            names.append(f"bench-np{slots}")
            await LlamaCppServer(base_url=server.url).save(names[-1], overwrite=True)
        shares_source = write_jsonl(work / "fleet-shares.jsonl", prompts(80))
        target = work / "fleet-shares.out.jsonl"
        summary = await llamacpp_batch_flow(
            str(shares_source),
            str(target),
            server=names,
            request={"max_tokens": 8, "extra_body": EXTRA},
        )
        done = {share.server: share.succeeded for share in summary.servers}
        total = sum(done.values())
        for name, slots in zip(names, (1, 3), strict=True):
            figures[f"share_{slots}"] = done[name] / total
    finally:
        for server in servers:
            server.stop()
    return figures


async def measure_embeddings(texts: int, rounds: int, work: Path) -> dict[str, float]:
    """Embeddings/s: the flow (native `input` lines, packed) against raw httpx sending the same
    packs with `total_slots` requests in flight and decoding the vectors, side by side."""
    import base64

    from harness.models import ensure_model
    from harness.server import LlamaServer
    from prefect_llamacpp.batch.options import DEFAULT_EMBEDDING_BATCH
    from prefect_llamacpp.blocks import LlamaCppServer
    from prefect_llamacpp.flows.batch import llamacpp_batch_flow

    documents = [f"Document {i}: notes on topic {i % 97} and item {i}." for i in range(texts)]
    source = work / "embed.jsonl"
    source.write_text(
        "".join(
            json.dumps({"custom_id": f"d{i}", "input": text}) + "\n"
            for i, text in enumerate(documents)
        )
    )
    packs = [
        documents[i : i + DEFAULT_EMBEDDING_BATCH]
        for i in range(0, len(documents), DEFAULT_EMBEDDING_BATCH)
    ]

    async def raw(url: str) -> float:
        limits = httpx.Limits(max_connections=SLOTS, max_keepalive_connections=SLOTS)
        gate = asyncio.Semaphore(SLOTS)
        vectors = 0
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:

            async def one(pack: list[str]) -> None:
                nonlocal vectors
                async with gate:
                    response = await http.post(
                        f"{url}/v1/embeddings",
                        json={"input": pack, "model": "tiny", "encoding_format": "base64"},
                    )
                    response.raise_for_status()
                    for entry in response.json()["data"]:
                        base64.b64decode(entry["embedding"])
                        vectors += 1

            started = time.monotonic()
            await asyncio.gather(*(one(pack) for pack in packs))
            assert vectors == texts
            return texts / (time.monotonic() - started)

    async def flow() -> tuple[float, float]:
        """Texts/s over the run (the summary's wall time, as the chat figures count it), and
        over the whole call (Prefect's per-run cost included: flow run, block, gate, artifacts)."""
        started = time.monotonic()
        summary = await llamacpp_batch_flow(
            str(source),
            str(work / f"embed-out-{time.monotonic_ns()}.jsonl"),
            server="bench-embed",
            request={"embeddings": True},
        )
        assert summary.failed == 0, summary.failed_by_kind
        return texts / summary.wall_time_s, texts / (time.monotonic() - started)

    args = ["-np", str(SLOTS), "-kvu", "--alias", "tiny", "--embeddings", "--pooling", "mean"]
    args += ["--cache-ram", "0"]  # docs/llama-server.md: the prompt cache slows them
    with LlamaServer(ensure_model("tiny"), args, log_dir=work) as server:
        await LlamaCppServer(base_url=server.url).save("bench-embed", overwrite=True)
        await raw(server.url)
        await flow()  # warm-up
        # Raw, flow, raw, flow, ..., raw: each flow run is set against the mean of the raw runs
        # either side of it, so the machine's drift over a minute (raw alone went from 910/s to
        # 1,290/s in one run) does not land on one side of a pair.
        raws, flows, calls = [await raw(server.url)], [], []
        for round_number in range(rounds):
            in_run, whole = await flow()
            flows.append(in_run)
            calls.append(whole)
            raws.append(await raw(server.url))
            print(
                f"[bench] embeddings round {round_number + 1}: flow {flows[-1]:.0f}/s in the run "
                f"({calls[-1]:.0f}/s with Prefect's per-run cost), raw {raws[-2]:.0f}/s before "
                f"and {raws[-1]:.0f}/s after: {flows[-1] / mean(raws[-2:]):.2f}",
                flush=True,
            )
    around = [mean(raws[index : index + 2]) for index in range(rounds)]
    return {
        "raw": mean(raws),
        "flow": mean(flows),
        "call": mean(calls),
        "ratio": median(f / r for f, r in zip(flows, around, strict=True)),
        "call_ratio": median(c / r for c, r in zip(calls, around, strict=True)),
    }


async def measure_object_storage(requests: int, rounds: int, work: Path) -> dict[str, float]:
    """The same batch to s3:// and to a local file, whole calls timed, rounds alternating."""
    import s3fs

    from harness.models import ensure_model
    from harness.server import LlamaServer
    from prefect_llamacpp.blocks import LlamaCppServer
    from prefect_llamacpp.flows.batch import llamacpp_batch_flow

    source = write_jsonl(work / "storage.jsonl", prompts(requests))
    s3fs.S3FileSystem().mkdir("bench-results")

    async def run(where: str) -> float:
        name = f"storage-out-{time.monotonic_ns()}.jsonl"
        output = f"s3://bench-results/{name}" if where == "s3" else str(work / name)
        started = time.perf_counter()
        summary = await llamacpp_batch_flow(
            str(source),
            output,
            server="bench-storage",
            request={"max_tokens": 32, "extra_body": EXTRA},
            run={"chunk_size": 100},  # a part every 100 answers: many publishes
        )
        assert summary.failed == 0 and summary.succeeded == requests, summary.failed_by_kind
        return summary.completion_tokens / (time.perf_counter() - started)

    args = ["-np", str(SLOTS), "-c", str(SLOTS * 1024), "--alias", "tiny"]
    ratios = []
    with LlamaServer(ensure_model("tiny"), args, log_dir=work) as server:
        await LlamaCppServer(base_url=server.url).save("bench-storage", overwrite=True)
        await run("local")  # warm-up
        for round_number in range(rounds):
            sides = ["local", "s3"] if round_number % 2 == 0 else ["s3", "local"]
            results = {where: await run(where) for where in sides}
            ratios.append(results["s3"] / results["local"])
            print(f"[bench] object storage round {round_number + 1}: {results}", flush=True)
    return {"ratio": median(ratios)}


async def measure_broker(requests: int, rounds: int, work: Path) -> dict[str, float]:
    """One run alone, broker on / off: the same short answers, whole calls, rounds alternating."""
    from harness.models import ensure_model
    from harness.server import LlamaServer
    from prefect_llamacpp.blocks import LlamaCppServer
    from prefect_llamacpp.flows.batch import llamacpp_batch_flow

    source = write_jsonl(work / "broker.jsonl", prompts(requests))

    async def run(broker: bool) -> float:
        started = time.perf_counter()
        summary = await llamacpp_batch_flow(
            str(source),
            str(work / f"broker-out-{time.monotonic_ns()}.jsonl"),
            server="bench-broker",
            request={"max_tokens": 8, "extra_body": EXTRA},
            run={"broker": broker},
        )
        assert summary.failed == 0 and summary.succeeded == requests, summary.failed_by_kind
        return requests / (time.perf_counter() - started)

    args = ["-np", str(SLOTS), "-c", str(SLOTS * 1024), "--alias", "tiny"]
    ratios = []
    with LlamaServer(ensure_model("tiny"), args, log_dir=work) as server:
        await LlamaCppServer(base_url=server.url).save("bench-broker", overwrite=True)
        await run(True)  # warm-up
        for round_number in range(rounds):
            sides = [True, False] if round_number % 2 == 0 else [False, True]
            results = {side: await run(side) for side in sides}
            ratios.append(results[True] / results[False])
            print(f"[bench] broker round {round_number + 1} (req/s): {results}", flush=True)
    return {"ratio": median(ratios)}


def measure_shards(requests: int, rounds: int, work: Path, endpoint: str) -> dict[str, float]:
    """2 shards on two workers / one run, over a fleet of two servers, whole calls."""
    import s3fs

    from harness.models import ensure_model
    from harness.prefect_server import prefect_server, talking_to
    from harness.s3 import S3_ENV
    from harness.server import LlamaServer
    from harness.work_pool import deploy_batch, worker
    from prefect_llamacpp.blocks import LlamaCppServer
    from prefect_llamacpp.flows.batch import llamacpp_batch_flow

    s3fs.S3FileSystem().mkdir("bench-shards")
    s3fs.S3FileSystem().put_file(
        str(write_jsonl(work / "shards.jsonl", prompts(requests))), "s3://bench-shards/in.jsonl"
    )
    args = ["-np", "2", "-c", "2048", "-t", "1", "--alias", "tiny"]  # one core each (fleet)
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(prefect_server(work / "shards-prefect")).api
        fleet = [
            stack.enter_context(LlamaServer(ensure_model("tiny"), args, log_dir=work))
            for _ in range(2)
        ]
        deployment = deploy_batch(api, work / "shards-project", "bench-pool", "bench-shards")
        for index in range(2):
            home = work / f"shards-worker-{index}"
            stack.enter_context(
                worker(api, home, "bench-pool", AWS_ENDPOINT_URL=endpoint, **S3_ENV)
            )
        stack.enter_context(talking_to(api))
        for index, server in enumerate(fleet):
            LlamaCppServer(base_url=server.url).save(f"bench-shard-{index}", overwrite=True)

        def run(shards: int) -> float:
            started = time.perf_counter()
            summary = asyncio.run(
                llamacpp_batch_flow(
                    "s3://bench-shards/in.jsonl",
                    f"s3://bench-shards/out-{time.monotonic_ns()}.jsonl",
                    server=["bench-shard-0", "bench-shard-1"],
                    request={"max_tokens": 16, "extra_body": EXTRA},
                    run={"shards": shards, "shard_deployment": deployment},
                )
            )
            assert summary.failed == 0 and summary.succeeded == requests, summary.failed_by_kind
            return requests / (time.perf_counter() - started)

        ratios = []
        for round_number in range(rounds):
            sides = [1, 2] if round_number % 2 == 0 else [2, 1]
            results = {side: run(side) for side in sides}
            ratios.append(results[2] / results[1])
            print(f"[bench] shards round {round_number + 1} (req/s): {results}", flush=True)
    return {"ratio": median(ratios)}


def memory_child(lines: int, url: str, work: Path) -> None:
    """Run one batch of `lines` tiny prompts in this process; print peak RSS and task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from prefect_llamacpp.flows.batch import llamacpp_batch_flow

    source: str | Path = write_jsonl(work / f"mem-{lines}.jsonl", prompts(lines))
    target = str(work / f"mem-{lines}.out.jsonl")
    os.environ["LLAMACPP_BASE_URL"] = url
    if os.environ.get("BENCH_ON_S3"):  # input and output on object storage
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.makedirs("bench-memory", exist_ok=True)
        fs.put_file(str(source), f"bench-memory/{Path(source).name}")
        source, target = f"s3://bench-memory/{Path(source).name}", f"s3://bench-memory/out-{lines}"

    async def run():
        state = await llamacpp_batch_flow(
            str(source),
            target,
            server=None,
            return_state=True,
            request={"max_tokens": 1},
        )
        summary = await state.aresult()
        async with get_client() as client:
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
                )
            )
        return summary, len(task_runs)

    summary, task_runs = asyncio.run(run())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "lines": lines,
                "peak_rss_mb": peak_mb,
                "end_rss_mb": _current_rss_mb(),
                "task_runs": task_runs,
                "succeeded": summary.succeeded,
            }
        )
    )


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(
    small: int, large: int, work: Path, s3_endpoint: str | None = None
) -> dict[str, float]:
    from prefect.settings import PREFECT_API_URL

    from harness.models import ensure_model
    from harness.server import LlamaServer

    results = {}
    # --cache-ram 0: tens of thousands of distinct prompts would otherwise fill llama-server's
    # host-memory prompt cache (8 GiB by default), and searching it slows the server, not us.
    args = ["-np", str(SLOTS), "--cache-ram", "0"]
    runs = [(small, False), (large, False)] + ([(large, True)] if s3_endpoint else [])
    with LlamaServer(ensure_model("tiny"), args, log_dir=work) as server:
        for lines, on_s3 in runs:
            # Reports to this run's Prefect API: an ephemeral one per child timed out starting.
            env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
            if on_s3:
                env["BENCH_ON_S3"] = "1"
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.batch_throughput",
                    "--memory-child",
                    str(lines),
                    server.url,
                    str(work),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=3600,
            )
            if child.returncode != 0:
                raise RuntimeError(child.stderr[-3000:])
            results["s3" if on_s3 else lines] = json.loads(child.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller runs, rougher figures")
    parser.add_argument("--memory-child", nargs=3, metavar=("LINES", "URL", "DIR"))
    parser.add_argument("--short-child", nargs=4, metavar=("KIND", "URL", "REQUESTS", "DIR"))
    args = parser.parse_args()
    if args.short_child:
        kind, url, requests, work = args.short_child
        short_child(kind, url, int(requests), Path(work))
        return
    if args.memory_child:
        lines, url, work = args.memory_child
        memory_child(int(lines), url, Path(work))
        return

    from prefect.testing.utilities import prefect_test_harness

    from harness.s3 import S3_ENV, s3_server

    small, large = (1_000, 10_000) if args.quick else (5_000, 50_000)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llamacpp-bench-")))
        stack.enter_context(prefect_test_harness(180))
        endpoint = stack.enter_context(s3_server(work))
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        rounds = 2 if args.quick else 4
        short = measure_short_answers(1000, 2 if args.quick else 3, work)
        tiny = asyncio.run(
            measure_model("tiny", 256 if args.quick else 512, 32, rounds, False, work)
        )
        bench = asyncio.run(
            measure_model(
                "bench", 24 if args.quick else 64, 32 if args.quick else 48, rounds, True, work
            )
        )
        memory = measure_memory(small, large, work, endpoint)
        fleet = asyncio.run(measure_fleet(128 if args.quick else 256, rounds, work))
        embed = asyncio.run(measure_embeddings(2_000 if args.quick else 5_000, 2 * rounds, work))
        storage = asyncio.run(measure_object_storage(500 if args.quick else 1_000, rounds, work))
        broker = asyncio.run(measure_broker(3_000, rounds, work))
        shards = measure_shards(4_000 if args.quick else 10_000, rounds, work, endpoint)

    rss_growth = memory[large]["peak_rss_mb"] - memory[small]["peak_rss_mb"]
    task_runs_per_1000 = memory[small]["task_runs"] * 1000 / small
    print()
    print(f"tiny  model: raw {tiny['raw']:8.1f} tok/s, flow {tiny['flow']:8.1f} tok/s")
    print(
        f"bench model: raw {bench['raw']:8.1f} tok/s, flow {bench['flow']:8.1f} tok/s, "
        f"flow at {SLOTS * 4} in flight {bench['wide']:8.1f} tok/s, naive loop {bench['naive']:8.1f} tok/s"
    )
    print(f"naive loop/raw throughput ratio: {bench['naive_ratio']:.2f} (bench model)")
    print(f"flow at 4x total_slots / flow at total_slots: {bench['wide_ratio']:.2f} (bench model)")
    print(
        f"peak RSS: {memory[small]['peak_rss_mb']:.0f} MB at {small} lines, "
        f"{memory[large]['peak_rss_mb']:.0f} MB at {large} lines: growth {rss_growth:.1f} MB "
        f"(RSS when done: {memory[small]['end_rss_mb']:.0f} and {memory[large]['end_rss_mb']:.0f} MB)"
    )
    print(
        f"peak RSS at {large} lines with input and output on S3: {memory['s3']['peak_rss_mb']:.0f}"
        f" MB (local files: {memory[large]['peak_rss_mb']:.0f} MB)"
    )
    print(f"Prefect task runs per 1,000 prompts: {task_runs_per_1000:.0f}")
    print(
        f"fleet of two (1 and 3 slots, 340 MB model): item shares {fleet['share_1']:.2f} and "
        f"{fleet['share_3']:.2f} against slot shares 0.25 and 0.75"
    )
    print(f"fleet of one / single-server flow: {fleet['fleet_of_one_ratio']:.2f} (tiny model)")
    print(
        f"embeddings: raw {embed['raw']:.0f}/s, flow {embed['flow']:.0f}/s in the run "
        f"({embed['call']:.0f}/s with Prefect's per-run cost); embeddings flow/raw throughput "
        f"ratio: {embed['ratio']:.2f} (tiny model; {embed['call_ratio']:.2f} with the per-run cost)"
    )
    print(
        f"short answers: raw {short['raw_rps']:.0f} req/s ({short['raw_cpu_ms']:.2f} ms CPU each), "
        f"flow {short['flow_rps']:.0f} req/s ({short['flow_cpu_ms']:.2f} ms CPU each); flow at "
        + ", ".join(f"queue depth {d}: {short[f'depth_{d}_rps']:.0f} req/s" for d in QUEUE_DEPTHS)
    )
    print(f"short-answer flow/raw throughput ratio: {short['ratio']:.2f} (tiny model)")
    print(f"client CPU per request flow/raw: {short['cpu_ratio']:.2f}")
    print(f"flow/raw throughput ratio: {tiny['ratio']:.2f} (tiny model)")
    print(f"flow/raw throughput ratio: {bench['ratio']:.2f} (bench model)")
    print(f"output on S3 / output to a local file: {storage['ratio']:.2f} (tiny model, whole call)")
    print(f"one run alone, broker on / off: {broker['ratio']:.2f} (tiny model, short answers)")
    print(
        f"2 shards on two workers / 1 run: {shards['ratio']:.2f} (tiny model, fleet of two, "
        "whole call; client, workers and servers share this machine's cores)"
    )


if __name__ == "__main__":
    main()
