"""One batch over several Prefect workers, and runs that share servers through the broker.

Real parts throughout: `prefect server start` (its lease service looking every second), a
process work pool with three `prefect worker start` processes, each in its own working directory
with its own empty local disk (TMPDIR), a deployment of the batch flow made with `prefect
deploy`, a fleet of two llama-servers, input and results on the session's S3 server. The parent
is the batch command with `--shards 3`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from harness.models import ensure_model
from harness.prefect_server import prefect_server as start_prefect_server
from harness.prefect_server import talking_to
from harness.s3 import S3_ENV
from harness.server import LlamaServer
from harness.work_pool import deploy_batch, kill_group, node_env, worker
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.flows.shards import batch_tag
from tests.flows.test_batch_flow import write_input
from tests.object_storage import upload

# Its own waits add up past the default 300 s on a loaded machine (set-up included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

LEASE_SECONDS = 60  # Prefect's shortest lease
POOL = "shards-pool"
PROMPTS = 3000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """A Prefect server, a process pool with the batch deployment, three workers, two servers."""
    root = tmp_path_factory.mktemp("cluster")
    env = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"}
    model = ensure_model("tiny")
    with ExitStack() as stack:
        api = stack.enter_context(start_prefect_server(root / "server-home", env=env)).api
        llamas = [
            stack.enter_context(
                LlamaServer(model, ["-np", "2", "-t", "1", "--alias", "tiny"], log_dir=root)
            )
            for _ in range(2)
        ]
        with talking_to(api):
            LlamaCppServer.register_type_and_schema()
            for name, llama in zip(("fleet-a", "fleet-b"), llamas, strict=True):
                LlamaCppServer(base_url=llama.openai_base, timeout=10).save(name, overwrite=True)
        deployment = deploy_batch(api, root / "project", POOL, "shards-e2e")
        s3 = {"AWS_ENDPOINT_URL": s3_server, **S3_ENV}
        workers = [
            stack.enter_context(worker(api, root / f"worker-{index}", POOL, **s3))
            for index in range(3)
        ]
        yield {"api": api, "deployment": deployment, "workers": workers}


def parent(api: str, home: Path, *args: str) -> subprocess.Popen:
    """The batch command on node `home`: the parent run of a sharded batch."""
    command = [sys.executable, "-m", "prefect_llamacpp.flows.batch", *args]
    return subprocess.Popen(
        command,
        cwd=home,
        env=node_env(api, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def sharded_args(source: str, output: str, deployment: str) -> list[str]:
    return [
        source,
        output,
        "--server",
        "fleet-a",
        "--server",
        "fleet-b",
        "--max-tokens",
        "4",
        "--chunk-size",
        "100",
        "--shards",
        "3",
        "--shard-deployment",
        deployment,
        "--lease-seconds",
        str(LEASE_SECONDS),
        "--checkpoint-seconds",
        "1",
    ]


def s3():
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs


def parts_of_every_shard(output: str) -> bool:
    fs = s3()
    key = output.removeprefix("s3://")
    return all(fs.exists(f"{key}.shards/{k}-of-3.jsonl.parts") for k in (1, 2, 3))


def runs_of_batch(api: str, tag: str) -> list[dict]:
    return httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"tags": {"all_": [tag]}}, "limit": 200},
        timeout=10,
    ).json()


def success_ids(data: bytes) -> Counter:
    lines = (json.loads(line) for line in data.splitlines())
    return Counter(line["custom_id"] for line in lines if line["error"] is None)


def finish(process: subprocess.Popen, timeout: float = 400) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err.decode()[-4000:]
    return json.loads(out)


def every_id_once(output: str) -> None:
    final = s3().cat_file(output)
    assert success_ids(final) == Counter({f"q{i}": 1 for i in range(PROMPTS)})
    assert len(final.splitlines()) == PROMPTS


def input_for(tmp_path: Path, bucket: str, name: str) -> tuple[str, str]:
    source = upload(write_input(tmp_path / "in.jsonl", PROMPTS), f"s3://{bucket}/{name}.in.jsonl")
    return source, f"s3://{bucket}/{name}.out.jsonl"


def test_three_shards_over_three_workers_answer_every_id_once(cluster, s3_bucket, tmp_path):
    source, output = input_for(tmp_path, s3_bucket, "happy")
    summary = finish(
        parent(
            cluster["api"],
            (tmp_path / "parent"),
            *sharded_args(source, output, cluster["deployment"]),
        )
    )
    every_id_once(output)
    assert summary["succeeded"] == PROMPTS and summary["failed"] == 0
    assert [share["shard"] for share in summary["shards"]] == ["1/3", "2/3", "3/3"]
    # Each shard took about a third (ids spread by their hash) and used both servers.
    assert all(800 < share["succeeded"] < 1200 for share in summary["shards"]), summary["shards"]
    assert {share["server"] for share in summary["servers"]} == {"fleet-a", "fleet-b"}
    runs = runs_of_batch(cluster["api"], batch_tag(source, output, 3))
    assert len(runs) == 3 and {run["state_type"] for run in runs} == {"COMPLETED"}
    # Three workers, each its own node: the shards ran on more than one of them.
    pids = {run["infrastructure_pid"].rsplit(":", 1)[-1] for run in runs}
    assert len(pids) == 3

    # Run again (a joined batch): every shard runs again, resumes from its parts, redoes nothing.
    again = finish(
        parent(
            cluster["api"], tmp_path / "again", *sharded_args(source, output, cluster["deployment"])
        )
    )
    assert again["skipped_done"] == PROMPTS and again["succeeded"] == 0
    assert len(runs_of_batch(cluster["api"], batch_tag(source, output, 3))) == 6
    every_id_once(output)


def test_a_worker_killed_mid_shard_its_shard_reruns_on_a_survivor(cluster, s3_bucket, tmp_path):
    source, output = input_for(tmp_path, s3_bucket, "killed-worker")
    tag = batch_tag(source, output, 3)
    process = parent(
        cluster["api"], (tmp_path / "parent"), *sharded_args(source, output, cluster["deployment"])
    )
    try:
        deadline = time.monotonic() + 240
        while not parts_of_every_shard(output):
            assert process.poll() is None, process.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the shards never got going"
            time.sleep(0.5)
        running = [
            run for run in runs_of_batch(cluster["api"], tag) if run["state_type"] == "RUNNING"
        ]
        assert running, "no shard was running"
        victim = running[0]
        flow_pid = int(victim["infrastructure_pid"].rsplit(":", 1)[-1])
        (owner,) = [w for w in cluster["workers"] if str(flow_pid) in _descendants(w.pid)]
        # The node dies: its worker's process group and the flow run's own (if it has one).
        flow_group = os.getpgid(flow_pid)
        kill_group(owner.pid)
        kill_group(flow_group)
        summary = finish(process, timeout=600)
    finally:
        kill_group(process.pid)
    every_id_once(output)
    runs = runs_of_batch(cluster["api"], tag)
    by_shard = Counter(next(t for t in run["tags"] if t.startswith("shard-")) for run in runs)
    victim_tag = next(t for t in victim["tags"] if t.startswith("shard-"))
    assert by_shard[victim_tag] == 2, by_shard  # started again once, on a surviving worker
    assert sum(by_shard.values()) == 4, by_shard
    again = next(s for s in summary["shards"] if s["attempts"] == 2)
    assert again["skipped_done"] > 0, "the rerun shard did not resume from its parts"


def test_the_parent_killed_and_rerun_starts_no_shard_twice(cluster, s3_bucket, tmp_path):
    source, output = input_for(tmp_path, s3_bucket, "killed-parent")
    tag = batch_tag(source, output, 3)
    args = sharded_args(source, output, cluster["deployment"])
    first = parent(cluster["api"], tmp_path / "parent-1", *args)
    deadline = time.monotonic() + 240
    while not parts_of_every_shard(output):
        assert first.poll() is None, first.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "the shards never got going"
        time.sleep(0.5)
    kill_group(first.pid)
    first.wait(10)
    killed_at = time.monotonic()

    attempts = 0
    while True:  # refused while the dead parent's lease on the output lives
        attempts += 1
        rerun = parent(cluster["api"], tmp_path / f"parent-{attempts + 1}", *args)
        out, err = rerun.communicate(timeout=600)
        if rerun.returncode == 0:
            break
        assert "is in use by another batch run" in err.decode(), err.decode()[-3000:]
        assert time.monotonic() - killed_at < LEASE_SECONDS + 60, "the lease never lapsed"
        time.sleep(3)
    summary = json.loads(out)
    every_id_once(output)
    runs = runs_of_batch(cluster["api"], tag)
    assert len(runs) == 3, [run["name"] for run in runs]  # adopted, none started twice
    # The shards ran on while the parent was gone: nothing was answered twice.
    assert sum(share["succeeded"] for share in summary["shards"]) == PROMPTS
    assert all(share["attempts"] == 1 for share in summary["shards"])


def _descendants(pid: int) -> set[str]:
    """Every descendant pid of `pid`, as strings."""
    found: set[str] = set()
    frontier = [str(pid)]
    while frontier:
        current = frontier.pop()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            ppid = stat.rsplit(")", 1)[1].split()[1]
            if ppid == current and proc.name not in found:
                found.add(proc.name)
                frontier.append(proc.name)
    return found
