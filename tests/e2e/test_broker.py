"""The capacity broker with real parts: two batch commands at once on one 4-slot llama-server,
sharing it through a real `prefect server start`. The server's own figures (`/metrics`: requests
processing + deferred) are read while they run: with the broker the two together stay within its
slots plus queue depth; without it (the control) they double it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists

from harness.models import ensure_model
from harness.prefect_server import prefect_server as start_prefect_server
from harness.prefect_server import talking_to
from harness.server import LlamaServer
from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.flows.capacity import limit_names
from tests.flows.test_batch_flow import write_input

# Two pairs of runs; on a loaded two-core machine each pair can take a couple of minutes.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SLOTS, QUEUE_DEPTH = 4, 1
# Each brokered run lasts well beyond the few broker periods a second run waits for its share
# (several seconds). Long answers: a client starved of CPU (the runs, the server and the Prefect
# API share two cores) still keeps its requests in flight between them. The control runs are
# side by side from the server's resumption and need not be long: on a loaded machine twice the
# requests the server has slots for went three times slower (1,500 answers in 400 s against
# 2,000 in 160 s brokered).
PROMPTS, CONTROL_PROMPTS, MAX_TOKENS = 1000, 300, 256


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    with start_prefect_server(home) as server:
        yield server.api


@pytest.fixture(scope="module")
def four_slots(tmp_path_factory):
    args = ["-np", str(SLOTS), "-c", "4096", "--metrics", "--alias", "tiny"]
    with LlamaServer(ensure_model("tiny"), args, log_dir=tmp_path_factory.mktemp("logs")) as llama:
        yield llama


class InFlight(threading.Thread):
    """Reads the server's requests in flight (processing + deferred) until stopped; the most."""

    def __init__(self, root: str) -> None:
        super().__init__(daemon=True)
        self.root, self.most, self.reads, self._done = root, 0, 0, threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._done.is_set():
                try:
                    text = client.get(f"{self.root}/metrics").text
                except httpx.HTTPError:  # slow to answer on a loaded machine: read again
                    time.sleep(0.02)
                    continue
                figures = {
                    name: float(value)
                    for name, value in re.findall(
                        r"^llamacpp:(requests_processing|requests_deferred) (\S+)$", text, re.M
                    )
                }
                self.most = max(self.most, int(sum(figures.values())))
                self.reads += 1
                time.sleep(0.02)

    def stop(self) -> int:
        self._done.set()
        if self.is_alive():
            self.join(10)
        return self.most


def batch(api: str, home: Path, *args: str) -> subprocess.Popen:
    """The batch command in its own directory; its log goes to `home/stderr.log` (a pipe left
    unread while the test waits on the other run would stall it)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with (home / "stderr.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect_llamacpp.flows.batch", *args],
            cwd=home,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
        )


def connected(pid: int, port: int) -> bool:
    """Whether process `pid` has a TCP connection established to 127.0.0.1:`port` (the kernel
    completes it while the server is stopped: its request waits in the socket)."""
    sockets = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    sockets.add(target[8:-1])
        table = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:  # it has exited: the caller says why
        return False
    for line in table.splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port and inode in sockets:
            return True
    return False


def two_batches_at_once(
    api: str, llama, tmp_path: Path, *extra: str, prompts: int = PROMPTS
) -> tuple[int, list[dict]]:
    """Both runs started with the server stopped (SIGSTOP) and resumed once both wait on it, so
    they run side by side whatever their start-ups take (a run lasts about as long as a start-up
    on a fast machine, and two start-ups can differ by more under load)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = write_input(tmp_path / "in.jsonl", prompts)
    homes = [tmp_path / name for name in ("a", "b")]
    args = ["--server", "four-slots", "--max-tokens", str(MAX_TOKENS)]
    args += ["--queue-depth", str(QUEUE_DEPTH), *extra]
    runs, watch = [], InFlight(llama.url)
    try:
        os.kill(llama.process.pid, signal.SIGSTOP)
        try:
            runs = [batch(api, home, str(source), "out.jsonl", *args) for home in homes]
            deadline = time.monotonic() + 120
            while not all(connected(run.pid, llama.port) for run in runs):
                for run, home in zip(runs, homes, strict=True):
                    assert run.poll() is None, (home / "stderr.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the runs never reached the server"
                time.sleep(0.1)
        finally:
            os.kill(llama.process.pid, signal.SIGCONT)
        watch.start()
        summaries = []
        for run, home in zip(runs, homes, strict=True):
            out, _ = run.communicate(timeout=400)
            assert run.returncode == 0, (home / "stderr.log").read_text()[-3000:]
            summaries.append(json.loads(out))
        most = watch.stop()
    finally:
        watch.stop()
        for run in runs:  # a failed pair must not load the server for what follows
            if run.poll() is None:
                run.kill()
                run.wait(10)
    assert watch.reads > 20, "the server's metrics were hardly read"
    # Both waited on the server from its resumption, so any bound was measured under contention;
    # and they were answered side by side for a good part of the shorter run (with the broker
    # the later one gets its share within a few periods, as the first one's requests finish).
    spans = [answered_between(home / "out.jsonl") for home in homes]
    together = min(end for _, end in spans) - max(start for start, _ in spans)
    shorter = min(end - start for start, end in spans)
    assert together >= 0.25 * shorter, spans
    print(f"side by side for {together:.1f} s of {shorter:.1f} s")
    return most, summaries


def answered_between(output: Path) -> tuple[float, float]:
    times = [
        datetime.fromisoformat(json.loads(line)["finished_at"]).timestamp()
        for line in output.read_text().splitlines()
    ]
    return min(times), max(times)


def test_two_batches_on_one_server_share_its_slots(prefect_api, four_slots, tmp_path):
    with talking_to(prefect_api):
        LlamaCppServer.register_type_and_schema()
        LlamaCppServer(base_url=four_slots.openai_base, timeout=10).save(
            "four-slots", overwrite=True
        )
    most, summaries = two_batches_at_once(prefect_api, four_slots, tmp_path / "brokered")
    assert all(summary["succeeded"] == PROMPTS for summary in summaries)
    assert 0 < most <= SLOTS + QUEUE_DEPTH, most
    print(f"in flight at most, two brokered runs: {most}")

    # The limit the broker made, sized from /props, with every slot given back.
    slots_limit = limit_names(four_slots.url)[0]
    limit = httpx.get(f"{prefect_api}/v2/concurrency_limits/{slots_limit}", timeout=10).json()
    assert limit["limit"] == SLOTS + QUEUE_DEPTH and limit["active_slots"] == 0, limit

    # The control: without the broker the same two runs double the server's load.
    unbrokered, _ = two_batches_at_once(
        prefect_api, four_slots, tmp_path / "control", "--no-broker", prompts=CONTROL_PROMPTS
    )
    assert unbrokered > SLOTS + QUEUE_DEPTH, unbrokered
    print(f"in flight at most, two runs without the broker: {unbrokered}")


async def test_the_health_canary_takes_a_slot_of_a_brokered_server(prefect_api, four_slots):
    from prefect.client.orchestration import get_client

    from prefect_llamacpp.flows.health import llamacpp_health_flow

    slots_limit = limit_names(four_slots.url)[0]
    with talking_to(prefect_api):
        await LlamaCppServer.aregister_type_and_schema()
        await LlamaCppServer(base_url=four_slots.openai_base, timeout=10).asave(
            "four-slots", overwrite=True
        )
        canary = {"first_byte_timeout": 2}
        async with get_client() as client:
            with contextlib.suppress(ObjectAlreadyExists):  # made by the batch test, or here
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=slots_limit, limit=SLOTS + QUEUE_DEPTH)
                )
            held = [
                await client.increment_concurrency_slots_with_lease(
                    names=[slots_limit], slots=1, mode="concurrency", lease_duration=60
                )
                for _ in range(SLOTS + QUEUE_DEPTH)
            ]  # every slot, as batch runs would hold them
            crowded = await llamacpp_health_flow(server="four-slots", canary=canary)
            for lease in held:
                await client.release_concurrency_slots_with_lease(lease.json()["lease_id"])
            free = await llamacpp_health_flow(server="four-slots", canary=canary)
            limit = await client.read_global_concurrency_limit_by_name(slots_limit)
    assert "every slot held by batch runs for 2 s" in crowded.status.canary
    assert free.status.state == "ready" and "every slot" not in free.status.canary
    assert limit.active_slots == 0  # the canary's slot given back
