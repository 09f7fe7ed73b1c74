"""`llamacpp_server`: a real llama-server started from a launch spec, watched, restarted, and
never left behind, whatever kills the process that started it."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from functools import partial
from pathlib import Path

import anyio
import pytest

from prefect_llamacpp.exceptions import ConfigurationError, LaunchError
from prefect_llamacpp.launch import LaunchSpec
from prefect_llamacpp.managed import llamacpp_server
from prefect_llamacpp.model_cache import fetch_model
from prefect_llamacpp.provider import llamacpp_health_check
from prefect_llamacpp.status import ServerState
from tests.object_storage import upload
from tests.servers import none_left

pytestmark = pytest.mark.timeout(180)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def spec(binary, model, **fields) -> LaunchSpec:
    return LaunchSpec(binary=str(binary), model=str(model), parallel=2, **fields)


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACPP_MODEL_CACHE", str(tmp_path / "models"))


async def test_started_ready_on_a_free_port_and_stopped_on_exit(llama_server_bin, tiny_model):
    events = []
    launch = spec(llama_server_bin, tiny_model, alias="tiny-launched")
    async with llamacpp_server(launch, on_event=lambda kind, *_: events.append(kind)) as server:
        status = await llamacpp_health_check(server.settings())
        assert status.state == ServerState.READY
        assert status.model_id == "tiny-launched" and status.total_slots == 2
        assert server.root.startswith("http://127.0.0.1:") and server.port > 0
        pid = server.pid
        assert alive(pid)
    assert not alive(pid) and server.keeper is None
    assert events == ["started", "stopped"]


async def test_the_key_reaches_the_server_and_never_its_command_line(llama_server_bin, tiny_model):
    launch = spec(llama_server_bin, tiny_model, api_key="sk-launched-secret-42")
    async with llamacpp_server(launch) as server:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert b"sk-launched-secret-42" not in cmdline
        assert (await llamacpp_health_check(server.settings())).state == ServerState.READY
        anonymous = server.settings().model_copy(update={"api_key": ""})
        assert (await llamacpp_health_check(anonymous)).state == ServerState.UNAUTHORIZED
    assert "sk-launched-secret-42" not in server.log_path.read_text()


@pytest.mark.parametrize("kill", ["process", "process group"])
def test_no_server_outlives_a_sigkilled_owner(llama_server_bin, tiny_model, tmp_path, kill):
    # The owner is a Python process of its own, as a flow run is; it prints the server's PID.
    program = textwrap.dedent(
        f"""
        import asyncio
        from prefect_llamacpp.launch import LaunchSpec
        from prefect_llamacpp.managed import llamacpp_server

        async def main():
            launch = LaunchSpec(binary={str(llama_server_bin)!r}, model={str(tiny_model)!r})
            async with llamacpp_server(launch) as server:
                print(server.pid, flush=True)
                await asyncio.sleep(600)

        asyncio.run(main())
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        pid = int(owner.stdout.readline())
        assert alive(pid)
        if kill == "process":
            owner.kill()
        else:
            os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
        assert gone_within(pid, 15), f"llama-server {pid} outlived its owner ({kill} SIGKILLed)"
    finally:
        with_group = [owner.pid]
        for leader in with_group:
            try:
                os.killpg(leader, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def test_a_server_that_exits_at_start_says_why_and_leaves_nothing(
    llama_server_bin, tiny_model
):
    launch = spec(llama_server_bin, tiny_model, extra_args=["--no-such-option"])
    with pytest.raises(LaunchError, match="exited with code .* while starting") as caught:
        async with llamacpp_server(launch):
            pytest.fail("a server that exits is never yielded")
    assert "--no-such-option" in str(caught.value)  # the log's tail names the fault


async def test_a_server_not_ready_in_time_is_stopped(tmp_path, tiny_model):
    never_ready = tmp_path / "llama-server"
    never_ready.write_text("#!/bin/sh\necho $$ > " + str(tmp_path / "pid") + "\nexec sleep 600\n")
    never_ready.chmod(0o755)
    launch = spec(never_ready, tiny_model, ready_timeout=1)
    with pytest.raises(LaunchError, match="not ready within 1 s .*ready_timeout"):
        async with llamacpp_server(launch):
            pass
    assert gone_within(int((tmp_path / "pid").read_text()), 15)


async def test_a_missing_model_fails_before_anything_starts(llama_server_bin, tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        async with llamacpp_server(spec(llama_server_bin, tmp_path / "absent.gguf")):
            pass


async def test_a_model_from_the_s3_server_is_downloaded_once(
    llama_server_bin, tiny_model, s3_bucket, tmp_path
):
    url = upload(tiny_model, f"s3://{s3_bucket}/models/tiny.gguf")
    launch = spec(llama_server_bin, url, model_size=tiny_model.stat().st_size)
    for _ in range(2):
        async with llamacpp_server(launch) as server:
            status = await llamacpp_health_check(server.settings())
            assert status.state == ServerState.READY and status.model_id == "tiny.gguf"
    assert len(list((tmp_path / "models").glob("*tiny.gguf"))) == 1


async def test_a_model_over_http_with_a_wrong_checksum_is_refused(
    llama_server_bin, tiny_model, tmp_path
):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_model.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/{tiny_model.name}"
        with pytest.raises(ConfigurationError, match="SHA-256 .* expects 0{64}"):
            async with llamacpp_server(spec(llama_server_bin, url, model_sha256="0" * 64)):
                pass
        async with llamacpp_server(spec(llama_server_bin, url)) as server:
            assert (await llamacpp_health_check(server.settings())).is_ready
    finally:
        httpd.shutdown()


def test_a_large_model_over_http_without_range_requests_is_downloaded(tmp_path):
    """Python's http.server answers no range requests: the download streams it instead."""
    served = tmp_path / "served"
    served.mkdir()
    blob = os.urandom(20 * 1024 * 1024)  # larger than one read block
    (served / "big.gguf").write_bytes(blob)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/big.gguf"
        digest = hashlib.sha256(blob).hexdigest()
        assert fetch_model(url, sha256=digest, size=len(blob)).read_bytes() == blob
    finally:
        httpd.shutdown()


async def test_a_port_already_taken_is_refused_not_joined(llama_server_bin, tiny_model):
    async with llamacpp_server(spec(llama_server_bin, tiny_model, alias="first")) as first:
        second = spec(llama_server_bin, tiny_model, alias="second", port=first.port)
        with pytest.raises(LaunchError, match=f"port {first.port} .* already in use.*port 0"):
            async with llamacpp_server(second):
                pytest.fail("another process's server is never yielded as ours")
        assert (await llamacpp_health_check(first.settings())).model_id == "first"


async def test_a_cancel_scope_that_cancels_again_still_stops_it(
    llama_server_bin, tiny_model, tmp_path
):
    """A Prefect flow's timeout cancels through anyio, again at every await: the stop must
    not depend on an await getting through."""
    model = Path(shutil.copy(tiny_model, tmp_path / "scoped.gguf"))
    entered = []
    with anyio.CancelScope() as scope:
        async with llamacpp_server(spec(llama_server_bin, model)) as server:
            entered.append(server.pid)
            scope.deadline = anyio.current_time() + 1  # from here: its start is another test
            await asyncio.sleep(60)
    assert entered and none_left(model, 15)


@pytest.mark.parametrize("after", [0.0005, 0.02, 0.2])
async def test_cancelled_while_starting_leaves_nothing(
    llama_server_bin, tiny_model, tmp_path, after
):
    model = Path(shutil.copy(tiny_model, tmp_path / "cancelled.gguf"))

    async def enter() -> None:
        async with llamacpp_server(spec(llama_server_bin, model)):
            await asyncio.sleep(60)

    task = asyncio.create_task(enter())
    await asyncio.sleep(after)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert none_left(model, 15)


async def test_a_stopped_server_is_found_wedged_restarted_and_then_given_up(
    llama_server_bin, tiny_model
):
    events = []
    launch = spec(
        llama_server_bin,
        tiny_model,
        restart={
            "check_interval": 0.5,
            "failed_checks": 2,
            "max_restarts": 1,
            "first_byte_timeout": 1,
        },
    )
    on_event = lambda kind, server, detail: events.append((kind, detail))  # noqa: E731
    async with llamacpp_server(launch, on_event=on_event) as server:
        first = server.pid
        os.kill(first, signal.SIGSTOP)  # alive, listening, answering nothing: wedged
        await until(lambda: "restarted" in [kind for kind, _ in events], 30)
        assert server.pid != first and gone_within(first, 5)
        assert (await llamacpp_health_check(server.settings())).is_ready
        reason = next(detail["reason"] for kind, detail in events if kind == "restarting")
        assert reason.startswith("wedged 2 checks in a row")
        os.kill(server.pid, signal.SIGKILL)  # a crash: the budget (1) is spent, it stays down
        await until(lambda: "gave_up" in [kind for kind, _ in events], 30)
        assert "process exited" in events[-1][1]["reason"]
    assert [kind for kind, _ in events] == [
        "started",
        "restarting",
        "restarted",
        "gave_up",
        "stopped",
    ]


async def test_a_crashed_server_is_restarted_at_once_on_its_port(llama_server_bin, tiny_model):
    launch = spec(llama_server_bin, tiny_model, restart={"check_interval": 0.3})
    async with llamacpp_server(launch) as server:
        port, first = server.port, server.pid
        os.kill(first, signal.SIGKILL)
        await until(lambda: server.pid != first and server.running, 30)
        await until(lambda: server.restarts and server.pid != first, 30)
        status = await wait_ready(server)
        assert status.is_ready and server.port == port


async def wait_ready(server, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while True:
        status = await llamacpp_health_check(server.settings(timeout=2))
        if status.is_ready or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


async def until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time given"
        await asyncio.sleep(0.1)
