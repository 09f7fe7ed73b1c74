"""A sharded batch: one parent run, one flow run per shard on a work pool, nothing lost or doubled.

The parent (the batch flow with `run.shards = N`) copies nothing: shard K of N is the batch flow
run with `shard="K/N"` on the same input (it keeps the lines whose custom_id hashes to it) and
its own object-storage output, `<output>.shards/K-of-N.jsonl`, published in parts like any
output, so it resumes on whichever worker runs it next. The parent:

- starts each shard with `run_deployment` (the parent's own deployment, or
  `run.shard_deployment`) under an idempotency key made of the batch (input, output, N), the
  shard and its attempt: a parent retried or rerun after a crash finds the shard runs by their
  tags and adopts them, never starting one twice;
- watches them: a shard run that failed or crashed is started again (at most `SHARD_ATTEMPTS`
  new runs per shard per parent run); one still "running" whose output lease has been free for
  `run.lease_seconds` lost its worker: it is marked crashed and started again, and resumes from
  its published parts (if it was alive after all, its lease renewal fails and it stops);
- shows the whole batch's progress (its shards' progress artifacts) while they work;
- at the end joins the shards' outputs into the output (and errors file), and writes one summary
  artifact with a row per shard and per server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from uuid import UUID

from prefect.artifacts import acreate_markdown_artifact, acreate_progress_artifact
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import ArtifactSort
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from prefect_llamacpp.batch.jsonl_input import Shard
from prefect_llamacpp.exceptions import BatchAbortedError, ConfigurationError
from prefect_llamacpp.flows.batch import (
    BatchSummary,
    ServerShare,
    ShardShare,
    log_outcome,
    render_summary,
)
from prefect_llamacpp.flows.launched import launch_parameter
from prefect_llamacpp.flows.output_lease import lease_name, output_lease
from prefect_llamacpp.storage import canonical_url, filesystem, is_url, shown

SHARD_ATTEMPTS = 3  # new runs per shard per parent run: a shard that fails this often stops it
# The parent looks at its shards every second at first, then less often as the batch goes on
# (a tenth of the time it has run, at most 10 s apart): a few API calls per shard each time.
MIN_POLL_SECONDS, MAX_POLL_SECONDS = 1.0, 10.0
PENDING_LEASES = 10  # a pending shard run with no lease is given up after this many leases
UNPICKED_WARNING_SECONDS = 60


def shard_output(output: str, shard: Shard) -> str:
    return f"{output}.shards/{shard.index}-of-{shard.count}.jsonl"


def batch_tag(source: str, output: str, count: int) -> str:
    """The tag every shard run of one batch carries: the batch is its input, output and N."""
    key = "\0".join((canonical_url(source), canonical_url(output), str(count)))
    return "llamacpp-batch-" + hashlib.sha256(key.encode()).hexdigest()[:16]


async def run_shards(job, storage: str | None, logger) -> BatchSummary:
    """Run `job` (a checked batch, `job.run.shards` > 1) as shards; returns its BatchSummary.
    Raises `ConfigurationError` before starting anything when the batch cannot be sharded."""
    count = job.run.shards
    source, output = str(job.source), str(job.output)
    if job.target is not None or not is_url(source) or source.startswith("file://"):
        raise ConfigurationError(
            "a sharded batch needs its input and output on storage every worker reaches "
            "(s3://, gs://, az://...); give URLs, or run it with run.shards = 1"
        )
    # Each shard's worker starts its own server from the same spec (a key only in a block).
    launch = launch_parameter(job.launch) if job.launch is not None else None
    deployment = await _shard_deployment(job.run.shard_deployment)
    fs, output_object = filesystem(output)
    async with output_lease(output, job.run.lease_seconds):
        await asyncio.to_thread(_check_layout, fs, output_object, output, count)
        tag = batch_tag(source, output, count)
        shards = [Shard(index, count) for index in range(1, count + 1)]
        parameters = {
            "input_path": source,
            "server": job.server,
            "request": job.request.model_dump(mode="json"),
            "run": job.run.model_copy(update={"shards": 1}).model_dump(mode="json"),
            "output_format": job.output_format,
            "storage": storage,
            "launch": launch,
        }
        started = time.monotonic()
        joined = await asyncio.to_thread(_joined_runs, fs, output_object)
        async with get_client() as client:
            watch = _Watch(client, deployment, tag, parameters, output, job.run.lease_seconds)
            runs = await watch.until_done(shards, joined, logger)
        summaries = await asyncio.to_thread(_join, fs, output, runs)
    summary = _summary(job, summaries, runs, watch.attempts, started)
    await acreate_markdown_artifact(
        markdown=render_summary(summary),
        key="llamacpp-batch-summary",
        description=f"llama.cpp batch in {count} shards: {summary.succeeded} succeeded, "
        f"{summary.failed} failed",
    )
    log_outcome(logger, summary)
    return summary


async def _shard_deployment(named: str | None) -> UUID | str:
    if named:
        return named
    context = FlowRunContext.get()
    deployment = context.flow_run.deployment_id if context and context.flow_run else None
    if deployment is None:
        raise ConfigurationError(
            "a sharded batch starts its shards on a deployment of the batch flow: run it from "
            "one (prefect.yaml: llamacpp-batch-shards) or set run.shard_deployment "
            "(--shard-deployment llamacpp-batch/llamacpp-batch-shards)"
        )
    return deployment


def _check_layout(fs, output_object: str, output: str, count: int) -> None:
    """Refuse an output written another way: by an unsharded run (its parts would be ignored)
    or in another number of shards (their work would be done again)."""
    if fs.exists(output_object + ".parts"):
        raise ConfigurationError(
            f"{shown(output)} holds the parts of an unsharded run; finish it with run.shards = "
            "1, or give the sharded batch another output"
        )
    try:
        names = fs.ls(output_object + ".shards", detail=False, refresh=True)
    except FileNotFoundError:
        return
    basenames = [name.rstrip("/").rsplit("/", 1)[-1] for name in names]
    counts = {name.split("-of-", 1)[1].split(".", 1)[0] for name in basenames if "-of-" in name}
    if counts - {str(count)}:
        raise ConfigurationError(
            f"{shown(output)} was written in {', '.join(sorted(counts))} shards; rerun it with "
            "that run.shards, or give another output"
        )


class _Watch:
    """Starts, adopts and restarts the shard runs until every one completed."""

    def __init__(self, client: PrefectClient, deployment, tag, parameters, output, lease_seconds):
        self.client, self.deployment, self.tag = client, deployment, tag
        self.parameters, self.output, self.lease_seconds = parameters, output, lease_seconds
        self.attempts: dict[Shard, int] = {}  # runs of each shard, over every parent run
        self._started_here: dict[Shard, int] = {}
        self._lease_free_since: dict[UUID, float] = {}
        self._scheduled_seen: dict[UUID, float] = {}
        self._warned: set[UUID] = set()
        self._logged_tenths = 0
        self._progress: UUID | None = None

    async def until_done(
        self, shards: list[Shard], joined: set[str], logger
    ) -> dict[Shard, FlowRun]:
        """Every shard's completed run. `joined`: the runs an earlier parent joined already."""
        started = time.monotonic()
        runs = {shard: await self._adopt_or_start(shard, joined, logger) for shard in shards}
        self._progress = await acreate_progress_artifact(
            progress=0.0,
            key="llamacpp-batch-progress",
            description="Share of input lines finished, over every shard.",
        )
        while True:
            for shard, run in list(runs.items()):
                if run.state is not None and run.state.is_completed():
                    continue
                current = await self.client.read_flow_run(run.id)
                runs[shard] = await self._follow(shard, current, logger)
            await self._show_progress(runs, logger)
            if all(run.state is not None and run.state.is_completed() for run in runs.values()):
                return runs
            elapsed = time.monotonic() - started
            await asyncio.sleep(min(MAX_POLL_SECONDS, max(MIN_POLL_SECONDS, elapsed / 10)))

    async def _adopt_or_start(self, shard: Shard, joined: set[str], logger) -> FlowRun:
        """The shard's last run when it is still going, or completed but never joined (its
        parent died); else a new run: a rerun of a joined batch runs every shard again (each
        resumes from its parts: done lines skipped, failed ones tried again, new ones run)."""
        earlier = await self._runs_of(shard)
        self.attempts[shard] = len(earlier)
        last = earlier[-1] if earlier else None
        if last is not None and not _failed(last) and str(last.id) not in joined:
            logger.info("Shard %s: following its run %s", shard, last.name)
            return last
        return await self._start(shard, last)

    async def _runs_of(self, shard: Shard) -> list[FlowRun]:
        runs = await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[self.tag, _shard_tag(shard)])
            )
        )
        return sorted(runs, key=lambda run: run.created)

    async def _start(self, shard: Shard, last: FlowRun | None) -> FlowRun:
        started = self._started_here.get(shard, 0)
        if started >= SHARD_ATTEMPTS:
            why = last.state.message if last is not None and last.state else "unknown"
            raise BatchAbortedError(
                f"shard {shard} failed {started} times (last: flow run {last.name if last else '?'}"
                f": {why}); its finished results are kept in its parts: rerun the batch to try "
                "again"
            )
        self._started_here[shard] = started + 1
        attempt = self.attempts[shard]
        self.attempts[shard] = attempt + 1
        return await run_deployment(
            self.deployment,
            parameters={
                **self.parameters,
                "output_path": shard_output(self.output, shard),
                "shard": str(shard),
            },
            timeout=0,  # the parent watches them all
            tags=[self.tag, _shard_tag(shard)],
            idempotency_key=f"{self.tag}-{_shard_tag(shard)}-attempt-{attempt}",
            flow_run_name=f"shard-{shard.index}-of-{shard.count}-attempt-{attempt + 1}",
        )

    async def _follow(self, shard: Shard, run: FlowRun, logger) -> FlowRun:
        state = run.state
        if state is None or state.is_completed():
            return run
        if _failed(run):
            return await self._start(shard, run)
        if not (state.is_running() or state.is_pending()):
            self._say_if_unpicked(shard, run, logger)
            return run  # scheduled: waits for a worker
        if await self._lease_held(shard):
            self._lease_free_since.pop(run.id, None)
            return run
        free_since = self._lease_free_since.setdefault(run.id, time.monotonic())
        # A pending run may still be starting its infrastructure (pulling an image, say).
        patience = self.lease_seconds * (1 if state.is_running() else PENDING_LEASES)
        if time.monotonic() - free_since < patience:
            return run
        # Its worker vanished: nothing holds its output. Crashed, so it never comes back.
        await self.client.set_flow_run_state(
            run.id,
            Crashed(
                message=f"no lease on its output for {patience:g} s while {state.type.value.lower()}:"
                " its worker is gone; the parent started the shard again"
            ),
            force=True,
        )
        return await self._start(shard, run)

    def _say_if_unpicked(self, shard: Shard, run: FlowRun, logger) -> None:
        waited = time.monotonic() - self._scheduled_seen.setdefault(run.id, time.monotonic())
        if waited >= UNPICKED_WARNING_SECONDS and run.id not in self._warned:
            self._warned.add(run.id)
            logger.warning(
                "Shard %s has waited %d s for a worker of its work pool: start one (a parent "
                "running on the same pool holds one of its slots while it waits)",
                shard,
                waited,
            )

    async def _lease_held(self, shard: Shard) -> bool:
        name = lease_name(canonical_url(shard_output(self.output, shard)))
        try:
            limit = await self.client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
        return limit.active_slots > 0

    async def _show_progress(self, runs: dict[Shard, FlowRun], logger) -> None:
        shares = await asyncio.gather(*(self._progress_of(run) for run in runs.values()))
        progress = round(sum(shares) / len(shares), 1)
        await self.client.update_artifact(self._progress, ArtifactUpdate(data=progress))
        if int(progress // 10) > self._logged_tenths:  # a log line every tenth of the batch
            self._logged_tenths = int(progress // 10)
            done = sum(run.state is not None and run.state.is_completed() for run in runs.values())
            logger.info("Batch %.0f%% done; %d of %d shards completed", progress, done, len(runs))

    async def _progress_of(self, run: FlowRun) -> float:
        if run.state is not None and run.state.is_completed():
            return 100.0
        artifacts = await self.client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]),
                key=ArtifactFilterKey(any_=["llamacpp-batch-progress"]),
            ),
            sort=ArtifactSort.UPDATED_DESC,
            limit=1,
        )
        return float(artifacts[0].data) if artifacts and artifacts[0].data is not None else 0.0


def _shard_tag(shard: Shard) -> str:
    return f"shard-{shard.index}-of-{shard.count}"


def _failed(run: FlowRun) -> bool:
    return run.state is not None and run.state.is_final() and not run.state.is_completed()


def _joined_runs(fs, output_object: str) -> set[str]:
    """The shard runs an earlier parent joined into this output."""
    record = output_object + ".shards/joined.json"
    return set(json.loads(fs.cat_file(record))) if fs.exists(record) else set()


def _join(fs, output: str, runs: dict[Shard, FlowRun]) -> list[dict]:
    """The shards' outputs, one after another, as the output (each id is in one shard only);
    the errors files likewise; the first shard's settings beside it; the runs joined recorded.
    Returns the shards' summaries."""
    _, output_object = filesystem(output)
    shards = list(runs)
    summaries = []
    for shard in shards:
        _, shard_object = filesystem(shard_output(output, shard))
        summary = shard_object + ".summary.json"
        if not fs.exists(summary):
            raise BatchAbortedError(
                f"shard {shard} completed but left no summary beside {shown(shard_output(output, shard))}"
                " (removed by hand?); give the batch another output (its shard runs are adopted, not rerun, on this one)"
            )
        figures = json.loads(fs.cat_file(summary))
        if (
            not fs.exists(shard_object)
            and figures["succeeded"] + figures["failed"] + figures["skipped_done"]
        ):
            raise BatchAbortedError(
                f"shard {shard} answered lines but its output {shown(shard_output(output, shard))} "
                "is missing (removed by hand?); give the batch another output (its shard runs are adopted, not rerun, on this one)"
            )
        summaries.append(figures)
    for suffix in ("", ".errors.jsonl"):
        names = [filesystem(shard_output(output, shard))[1] + suffix for shard in shards]
        present = [name for name in names if fs.exists(name)]
        if not present and suffix:
            continue
        with fs.open(output_object + suffix, "wb") as target:
            for name in present:
                with fs.open(name, "rb") as part:
                    shutil.copyfileobj(part, target, 8 * 1024 * 1024)
    settings = filesystem(shard_output(output, shards[0]))[1] + ".settings.json"
    if fs.exists(settings):
        fs.pipe_file(output_object + ".settings.json", fs.cat_file(settings))
    joined = sorted(str(run.id) for run in runs.values())
    fs.pipe_file(output_object + ".shards/joined.json", json.dumps(joined).encode())
    return summaries


def _summary(job, summaries: list[dict], runs, attempts, started: float) -> BatchSummary:
    """The whole batch's summary from its shards' own."""
    total = BatchSummary(
        input_path=shown(job.source),
        output_path=shown(job.output),
        server=next((s["server"] for s in summaries if s.get("server")), ""),
        base_url=next((s["base_url"] for s in summaries if s.get("base_url")), ""),
        model=next((s["model"] for s in summaries if s.get("model")), ""),
        concurrency=max((s.get("concurrency", 0) for s in summaries), default=0),
        output_format=job.output_format,
    )
    servers: dict[str, ServerShare] = {}
    for shard, figures in zip(runs, summaries, strict=True):
        for name in ("succeeded", "failed", "skipped_done", "retries", "server_waits"):
            setattr(total, name, getattr(total, name) + figures.get(name, 0))
        for name in ("crashes_seen", "prompt_tokens", "completion_tokens", "chunks"):
            setattr(total, name, getattr(total, name) + figures.get(name, 0))
        for kind, number in figures.get("failed_by_kind", {}).items():
            total.failed_by_kind[kind] = total.failed_by_kind.get(kind, 0) + number
        for share in figures.get("servers", []):
            merged = servers.setdefault(
                share["server"], ServerShare(server=share["server"], capacity=share["capacity"])
            )
            for name in ("succeeded", "failed", "taken_out", "rejoined"):
                setattr(merged, name, getattr(merged, name) + share.get(name, 0))
        total.shards.append(
            ShardShare(
                shard=str(shard),
                flow_run=runs[shard].name,
                attempts=attempts[shard],
                succeeded=figures.get("succeeded", 0),
                failed=figures.get("failed", 0),
                skipped_done=figures.get("skipped_done", 0),
                completion_tokens_per_s=figures.get("completion_tokens_per_s", 0.0),
            )
        )
    wall = time.monotonic() - started
    total.wall_time_s = round(wall, 3)
    total.completion_tokens_per_s = round(total.completion_tokens / wall, 2) if wall else 0
    for merged in servers.values():
        tokens = sum(
            share.get("completion_tokens_per_s", 0) * figures.get("wall_time_s", 0)
            for figures in summaries
            for share in figures.get("servers", [])
            if share["server"] == merged.server
        )
        merged.completion_tokens_per_s = round(tokens / wall, 2) if wall else 0
    total.servers = list(servers.values())
    if any(figures.get("errors_path") for figures in summaries):
        total.errors_path = str(job.output) + ".errors.jsonl"
    return total
