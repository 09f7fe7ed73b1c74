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
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from harness.models import ensure_model
from harness.s3 import S3_ENV
from harness.server import LlamaServer
from prefect_llamacpp.blocks import LlamaCppServer
from tests.flows.test_batch_flow import write_input
from tests.object_storage import upload
from tests.prefect_server import prefect_server as start_prefect_server

pytestmark = pytest.mark.integration

LEASE_SECONDS = 60  # Prefect's shortest lease
POOL = "shards-pool"
DEPLOYMENT = "llamacpp-batch/shards-e2e"
PROMPTS = 3000


def prefect_env(api: str, home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(home / "prefect-home"),
        "TMPDIR": str(home / "tmp"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **extra,
    }


def node(root: Path, name: str) -> Path:
    """A node: its own working directory holding its own (empty) temporary disk."""
    home = root / name
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """A Prefect server, a process pool with the batch deployment, three workers, two servers."""
    root = tmp_path_factory.mktemp("cluster")
    env = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"}
    model = ensure_model("tiny")
    with ExitStack() as stack:
        (root / "server-home").mkdir()
        api = stack.enter_context(start_prefect_server(root / "server-home", env=env)).api
        llamas = [
            stack.enter_context(
                LlamaServer(model, ["-np", "2", "--metrics", "--alias", "tiny"], log_dir=root)
            )
            for _ in range(2)
        ]
        with temporary_settings({PREFECT_API_URL: api}):
            LlamaCppServer.register_type_and_schema()
            for name, llama in zip(("fleet-a", "fleet-b"), llamas, strict=True):
                LlamaCppServer(base_url=llama.openai_base, timeout=10).save(name, overwrite=True)
        project = node(root, "project")
        (project / "prefect.yaml").write_text(
            "name: shards-e2e\n"
            "pull: []\n"
            "deployments:\n"
            "  - name: shards-e2e\n"
            "    entrypoint: prefect_llamacpp.flows.batch:llamacpp_batch_flow\n"
            f"    work_pool: {{name: {POOL}}}\n"
        )
        prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
        for command in (
            ["work-pool", "create", POOL, "--type", "process"],
            ["deploy", "--all"],
        ):
            done = subprocess.run(
                prefect + command,
                cwd=project,
                env=prefect_env(api, project),
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        workers = {}
        for index in range(3):
            home = node(root, f"worker-{index}")
            workers[index] = stack.enter_context(worker(api, home, s3_server))
        yield {"api": api, "root": root, "llamas": llamas, "workers": workers}


@contextmanager
def worker(api: str, home: Path, s3_endpoint: str):
    log = open(home / "worker.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1"],
        cwd=home,
        env=prefect_env(
            api, home, PREFECT_WORKER_QUERY_SECONDS="1", AWS_ENDPOINT_URL=s3_endpoint, **S3_ENV
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killed whole, as a node dies
    )
    try:
        yield process
    finally:
        kill_group(process.pid)
        process.wait(30)
        log.close()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def parent(api: str, home: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "prefect_llamacpp.flows.batch", *args]
    return subprocess.Popen(
        command,
        cwd=home,
        env=prefect_env(api, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def sharded_args(source: str, output: str) -> list[str]:
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
        DEPLOYMENT,
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
        parent(cluster["api"], node(tmp_path, "parent"), *sharded_args(source, output))
    )
    every_id_once(output)
    assert summary["succeeded"] == PROMPTS and summary["failed"] == 0
    assert [share["shard"] for share in summary["shards"]] == ["1/3", "2/3", "3/3"]
    # Each shard took about a third (ids spread by their hash) and used both servers.
    assert all(800 < share["succeeded"] < 1200 for share in summary["shards"]), summary["shards"]
    assert {share["server"] for share in summary["servers"]} == {"fleet-a", "fleet-b"}
    from prefect_llamacpp.flows.shards import batch_tag

    runs = runs_of_batch(cluster["api"], batch_tag(source, output, 3))
    assert len(runs) == 3 and {run["state_type"] for run in runs} == {"COMPLETED"}
    # Three workers, each its own node: the shards ran on more than one of them.
    pids = {run["infrastructure_pid"].rsplit(":", 1)[-1] for run in runs}
    assert len(pids) == 3


def test_a_worker_killed_mid_shard_its_shard_reruns_on_a_survivor(cluster, s3_bucket, tmp_path):
    source, output = input_for(tmp_path, s3_bucket, "killed-worker")
    from prefect_llamacpp.flows.shards import batch_tag

    tag = batch_tag(source, output, 3)
    process = parent(cluster["api"], node(tmp_path, "parent"), *sharded_args(source, output))
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
        worker_pid = next(
            process.pid
            for process in cluster["workers"].values()
            if str(flow_pid) in _children(process.pid) or flow_pid == process.pid
        )
        kill_group(worker_pid)
        kill_group(os.getpgid(flow_pid)) if _alive(flow_pid) else None
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
    from prefect_llamacpp.flows.shards import batch_tag

    tag = batch_tag(source, output, 3)
    args = sharded_args(source, output)
    first = parent(cluster["api"], node(tmp_path, "parent-1"), *args)
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
        rerun = parent(cluster["api"], node(tmp_path, f"parent-{attempts + 1}"), *args)
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


def _children(pid: int) -> set[str]:
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
