"""The test harness itself: where the binary comes from, and that servers never outlive a test."""

from __future__ import annotations

import os
import stat

import pytest

from harness import binary
from harness.server import LlamaServer, LlamaServerStartError
from tests.integration.test_managed_server import gone_within

pytestmark = pytest.mark.integration


def test_env_binary_wins_and_a_bad_one_is_named(monkeypatch, tmp_path, llama_server_bin):
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(llama_server_bin))
    assert binary.find_llama_server() == llama_server_bin
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(binary.ServerBinaryError, match="LLAMA_SERVER_BIN"):
        binary.find_llama_server()


def test_path_comes_before_the_cache(monkeypatch, tmp_path):
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("LLAMA_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert binary.find_llama_server() == fake


def test_cached_binary_is_found_without_building(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAMA_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert binary.find_llama_server() is None  # nothing cached here: a build would start
    cached = binary.cached_binary()
    cached.parent.mkdir(parents=True)
    cached.write_text("#!/bin/sh\n")
    monkeypatch.setattr(binary, "_build", lambda *a: pytest.fail("built although cached"))
    assert binary.ensure_llama_server(log=lambda m: None) == cached


def test_stop_leaves_no_process(llama_server_bin, tiny_model, tmp_path):
    server = LlamaServer(tiny_model, [], binary=llama_server_bin, log_dir=tmp_path).start()
    pid = server.process.pid
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_server_that_cannot_start_says_why(llama_server_bin, tmp_path):
    server = LlamaServer(
        tmp_path / "no-such-model.gguf", [], binary=llama_server_bin, log_dir=tmp_path
    )
    with pytest.raises(LlamaServerStartError, match="exited with code"):
        server.start(timeout=30)
    assert "llama-server log" in server.log_tail()


def test_server_dies_with_a_killed_parent(llama_server_bin, tiny_model, tmp_path):
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from harness.server import LlamaServer\n"
        f"s = LlamaServer({str(tiny_model)!r}, [], binary={str(llama_server_bin)!r}).start()\n"
        "print(s.process.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": str(binary.Path(__file__).resolve().parents[2])},
    )
    server_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can clean up
    parent.wait()
    if gone_within(server_pid, 30):
        return
    os.kill(server_pid, signal.SIGKILL)
    pytest.fail("llama-server outlived the process that started it")
