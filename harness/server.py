"""Start and stop a real `llama-server` on a free 127.0.0.1 port.

    with LlamaServer(model=ensure_model("tiny"), args=["-np", "4", "--metrics"]) as server:
        print(server.url)            # http://127.0.0.1:PORT

The process is always stopped: on `stop()`, on leaving the `with` block, at interpreter exit,
and (Linux, with util-linux's setpriv) when the Python process that started it dies, so no test
leaves one behind. Start servers from the main thread: the kernel ties them to the thread that
started them. The server's output goes to a log file whose tail is in every startup error.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from harness.binary import ensure_llama_server
from prefect_llamacpp.server_url import server_url_at

_RUNNING: set[LlamaServer] = set()


class LlamaServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """One llama-server process. `model=None` with `--models-dir` in `args` starts router mode."""

    def __init__(
        self,
        model: Path | str | None = None,
        args: list[str] | None = None,
        *,
        port: int | None = None,
        binary: Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.model = Path(model) if model else None
        self.args = list(args or [])
        self.port = port or free_port()
        self.binary = binary or ensure_llama_server()
        log_dir = Path(log_dir or tempfile.gettempdir())
        self.log_path = log_dir / f"llama-server-{self.port}-{os.getpid()}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return server_url_at("127.0.0.1", self.port).root

    @property
    def openai_base(self) -> str:
        return server_url_at("127.0.0.1", self.port).openai_base

    def command(self) -> list[str]:
        cmd = [*_DIE_WITH_PARENT, str(self.binary), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.model:
            cmd += ["-m", str(self.model)]
        return cmd + self.args

    def start(self, wait: str | None = "ready", timeout: float = 120) -> LlamaServer:
        """Start the process; `wait` is "ready" (/health 200), "listening" (port open) or None."""
        if self.process and self.process.poll() is None:
            raise LlamaServerStartError(f"server on port {self.port} is already running")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it
        )
        log.close()
        _RUNNING.add(self)
        if wait == "listening":
            self.wait_listening(timeout)
        elif wait == "ready":
            self.wait_ready(timeout)
        return self

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.02)
        raise LlamaServerStartError(
            f"llama-server did not listen within {timeout} s\n{self.log_tail()}"
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise LlamaServerStartError(f"llama-server not ready within {timeout} s\n{self.log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown."""
        if self.process and self.process.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.process.wait()
        _RUNNING.discard(self)

    def _signal_group(self, signum: int) -> None:
        # The server leads its own process group; router mode's model processes are in it too.
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def restart(self, wait: str | None = "ready", timeout: float = 120) -> LlamaServer:
        self.stop()
        return self.start(wait=wait, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "--- llama-server log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = self.process.returncode if self.process else None
            raise LlamaServerStartError(
                f"llama-server exited with code {code}: {' '.join(self.command())}\n{self.log_tail()}"
            )

    def __enter__(self) -> LlamaServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __hash__(self) -> int:
        return id(self)


# Linux: the kernel sends SIGTERM to the server if the Python process dies, even by SIGKILL.
# setpriv (util-linux) sets that before exec; a preexec_fn would not be fork-safe with threads.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "SIGTERM", "--"] if shutil.which("setpriv") else []


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop(timeout=5)
