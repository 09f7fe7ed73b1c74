"""One object-storage output, several nodes: a real `prefect server start` (its lease service
looking every second), the batch command run as users run it in processes with their own
working directory and their own empty local disk (TMPDIR), a real llama-server behind a proxy
that holds completions on demand, results on the session's S3 server.

Two runs at once on one output: the second is refused, nothing sent. The holder SIGKILLed:
its lease outlives it, then lapses; a run on a third node resumes from the published parts:
every id exactly once, nothing published redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from harness.prefect_server import prefect_server as start_prefect_server
from harness.prefect_server import talking_to
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.flows.output_lease import lease_name
from prefect_llamacpp.storage import canonical_url
from tests.flows.test_batch_flow import write_input
from tests.object_storage import upload
from tests.stalling_proxy import StallingProxy

# Its own waits add up past the default 300 s on a loaded machine (set-up included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

LEASE_SECONDS = 60  # Prefect's shortest lease


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    # The repossessor frees expired leases; by default it looks every 15 s.
    env = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"}
    with start_prefect_server(tmp_path_factory.mktemp("prefect-home"), env=env) as server:
        yield server.api


def node(tmp_path: Path, name: str) -> Path:
    """A node: its own working directory holding its own (empty) temporary disk."""
    home = tmp_path / name
    (home / "tmp").mkdir(parents=True)
    return home


def held(api: str, output: str) -> int:
    """Slots of `output`'s lease taken, as the Prefect API says."""
    name = lease_name(canonical_url(output))
    limit = httpx.get(f"{api}/v2/concurrency_limits/{name}", timeout=10)
    limit.raise_for_status()
    return limit.json()["active_slots"]


def batch(api: str, home: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "TMPDIR": str(home / "tmp"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    command = [sys.executable, "-m", "prefect_llamacpp.flows.batch", *args]
    return subprocess.Popen(
        command,
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: killed whole, as a node dies
    )


def objects(url: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return {name: fs.cat_file(name) for name in fs.find(url.removeprefix("s3://") + ".parts")}


def success_ids(data: bytes) -> Counter:
    lines = (json.loads(line) for line in data.splitlines())
    return Counter(line["custom_id"] for line in lines if line["error"] is None)


def test_one_run_per_output_across_nodes_and_a_killed_one_resumed_elsewhere(
    prefect_api, server, s3_bucket, tmp_path
):
    source = upload(write_input(tmp_path / "in.jsonl", 200), f"s3://{s3_bucket}/in.jsonl")
    output = f"s3://{s3_bucket}/results/out.jsonl"
    with StallingProxy(server.url, mode="hold", hold_after=30) as proxy:
        with talking_to(prefect_api):
            LlamaCppServer.register_type_and_schema()
            LlamaCppServer(base_url=proxy.url + "/v1", timeout=5).save("nodes", overwrite=True)
        args = [source, output, "--server", "nodes", "--max-tokens", "8", "--chunk-size", "10"]
        args += ["--lease-seconds", str(LEASE_SECONDS), "--checkpoint-seconds", "1"]

        first = batch(prefect_api, node(tmp_path, "node-a"), *args)
        try:
            deadline = time.monotonic() + 120
            # Held mid-run: it certainly holds the lease, and has published what it finished.
            while proxy.held == 0 or not objects(output):
                assert first.poll() is None, first.communicate()[1].decode()[-2000:]
                assert time.monotonic() < deadline, "the first run never got going"
                time.sleep(0.2)

            seen = proxy.completions_seen
            second = batch(prefect_api, node(tmp_path, "node-b"), *args)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 1, err.decode()[-2000:]
            assert "is in use by another batch run" in err.decode()
            assert proxy.completions_seen == seen, "the refused run sent requests"
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the node dies: no cleanup, no last publish
            first.wait(10)
        killed_at = time.monotonic()
        published = success_ids(b"".join(objects(output).values()))
        assert 0 < sum(published.values()) <= 30 and set(published.values()) == {1}
        proxy.release()

        # Its lease outlives it for a while (read from the API at once, not by a process whose
        # start-up could outlast what is left of it), then lapses: a run on a third node resumes.
        assert held(prefect_api, output) == 1, "the dead run's lease was free at once"
        while held(prefect_api, output):
            assert time.monotonic() - killed_at < LEASE_SECONDS + 60, "the lease never lapsed"
            time.sleep(1)
        third = batch(prefect_api, node(tmp_path, "node-c"), *args)
        out, err = third.communicate(timeout=300)
        assert third.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out)
    assert summary["skipped_done"] == sum(published.values()), "published work was redone"
    assert summary["succeeded"] == 200 - summary["skipped_done"]
    import s3fs

    s3fs.S3FileSystem().invalidate_cache()
    final = s3fs.S3FileSystem().cat_file(output)
    assert success_ids(final) == Counter({f"q{i}": 1 for i in range(200)})


def test_a_holder_frozen_past_its_lease_cannot_undo_the_run_that_went_on(
    prefect_api, server, s3_bucket, tmp_path
):
    """The lease lapses while its holder still lives (SIGSTOP: a VM paused, a long GC). A run on
    another node takes the output over and finishes; the holder wakes with answers in hand and
    must stop without touching the output the other run joined."""
    source = upload(write_input(tmp_path / "in.jsonl", 200), f"s3://{s3_bucket}/z-in.jsonl")
    output = f"s3://{s3_bucket}/results/zombie.jsonl"
    with StallingProxy(server.url, mode="hold", hold_after=30) as proxy:
        with talking_to(prefect_api):
            LlamaCppServer.register_type_and_schema()
            LlamaCppServer(base_url=proxy.url + "/v1", timeout=5).save("zombie", overwrite=True)
        args = [source, output, "--server", "zombie", "--max-tokens", "8", "--chunk-size", "10"]
        args += ["--lease-seconds", str(LEASE_SECONDS), "--checkpoint-seconds", "1"]

        frozen = batch(prefect_api, node(tmp_path, "node-a"), *args)
        try:
            deadline = time.monotonic() + 120
            while proxy.held == 0 or not objects(output):
                assert frozen.poll() is None, frozen.communicate()[1].decode()[-2000:]
                assert time.monotonic() < deadline, "the first run never got going"
                time.sleep(0.2)
            os.killpg(frozen.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            while held(prefect_api, output):
                assert time.monotonic() - frozen_at < LEASE_SECONDS + 60, "the lease never lapsed"
                time.sleep(1)
            # Its held requests are answered now, into the sockets of a process that sleeps.
            proxy.release()
            other = batch(prefect_api, node(tmp_path, "node-b"), *args)
            out, err = other.communicate(timeout=300)
            assert other.returncode == 0, err.decode()[-2000:]
            import s3fs

            fs = s3fs.S3FileSystem()
            fs.invalidate_cache()
            joined = fs.cat_file(output)
            assert success_ids(joined) == Counter({f"q{i}": 1 for i in range(200)})

            os.killpg(frozen.pid, signal.SIGCONT)
            _, err = frozen.communicate(timeout=300)
        finally:
            if frozen.poll() is None:
                os.killpg(frozen.pid, signal.SIGKILL)
                frozen.wait(10)
    assert frozen.returncode != 0, "the woken run went on as if it still held the output"
    print("the woken run said:", err.decode().strip().splitlines()[-1][:300])
    fs.invalidate_cache()
    assert fs.cat_file(output) == joined, "the woken run changed the joined output"
    assert json.loads(out)["skipped_done"] > 0  # the other run resumed from the frozen one's parts
