"""Managed servers: a llama-server this process starts, watches, restarts and always stops.

    async with llamacpp_server(LaunchSpec(model="/models/tiny.gguf")) as server:
        status = await llamacpp_health_check(server.settings())

On entry: the binary and the model are found (a URL is downloaded into the model cache once),
the server starts on a free loopback port (or the spec's), and the block waits until it is
ready (loading is logged as it goes). While the block runs, a watcher checks it every
`restart.check_interval` seconds with the one-token canary and restarts it, on the same port, at
most `restart.max_restarts` times per `restart.window`: when its process exited, or when
`restart.failed_checks` checks in a row found it wedged (completions stuck with nothing
progressing, or `/health` accepted and never answered: the process stopped or stuck). On exit, whatever the cause, it is stopped.

No orphans: the server is started by a keeper process (`_keeper.py`) that holds one end of a
pipe to this process; when this process dies in any way, SIGKILL included, the kernel closes the
pipe and the keeper stops the server. If the keeper is killed too, the kernel sends the server
SIGKILL (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from prefect_llamacpp.canary import CanaryOptions
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.exceptions import LaunchError, LlamaCppError, ServerLoadingError
from prefect_llamacpp.launch import LaunchSpec, find_llama_server, server_command, server_env
from prefect_llamacpp.log import get_logger_with_context
from prefect_llamacpp.model_cache import fetch_model
from prefect_llamacpp.provider import llamacpp_health_check
from prefect_llamacpp.server_url import ServerURL, listens_everywhere, server_url_at
from prefect_llamacpp.status import ProviderHealthStatus, ServerState

_KEEPER = Path(__file__).with_name("_keeper.py")
LOG_TAIL_LINES = 30
# Ready-wait poll: fast at first (a small model loads in well under a second), then gentler.
_POLL_FIRST, _POLL_MAX = 0.05, 1.0
# What happened to a managed server, for the caller's events: started, restarting, restarted,
# gave_up, stopped; `detail` says why and the figures.
OnEvent = Callable[[str, "ManagedServer", dict[str, Any]], None]
Check = Callable[["ManagedServer"], Awaitable[ProviderHealthStatus]]

logger = get_logger_with_context("managed")


class ManagedServer:
    """One llama-server started from a `LaunchSpec`. Use `llamacpp_server(...)` rather than
    calling `start`/`stop` by hand."""

    def __init__(
        self, spec: LaunchSpec, *, on_event: OnEvent | None = None, log_dir: Path | None = None
    ) -> None:
        self.spec = spec
        self.on_event = on_event or (lambda *_: None)
        # Private by default (mode 0700, a fresh name): not a shared, guessable /tmp path.
        self.log_dir = Path(log_dir) if log_dir else None
        self.port = spec.port
        self.binary: Path | None = None
        self.model_path: Path | None = None
        self.keeper: subprocess.Popen | None = None
        self.pid: int | None = None  # the llama-server's own
        self.restarts: deque[float] = deque()  # monotonic times, within the window
        self.log_path: Path | None = None

    # -- what callers use ------------------------------------------------------------------

    @property
    def root(self) -> str:
        """The server's root URL, as this machine reaches it."""
        return self._url.root

    @property
    def base_url(self) -> str:
        return self._url.openai_base

    @property
    def _url(self) -> ServerURL:
        host = "127.0.0.1" if listens_everywhere(self.spec.host) else self.spec.host
        return server_url_at(host, self.port)  # listening everywhere: reached here on loopback

    @property
    def label(self) -> str:
        """A short name for logs and reports: the model id and the port."""
        return f"{self.spec.model_id}@{self.port}"

    def settings(self, timeout: float = 30.0) -> LlamaCppSettings:
        """How to reach it: what the provider library, the health check and a block take."""
        return LlamaCppSettings(
            base_url=self.base_url, api_key=self.spec.api_key, timeout=timeout, model_name=""
        )

    @property
    def running(self) -> bool:
        return self.keeper is not None and self.keeper.poll() is None

    # -- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        """Find the binary and the model, start the server, wait until it is ready. Raises
        `ConfigurationError` (binary, model) or `LaunchError` (exited, not ready in time)."""
        self.binary = find_llama_server(self.spec.binary or None)
        self.model_path = await asyncio.to_thread(
            fetch_model,
            self.spec.model,
            sha256=self.spec.model_sha256,
            size=self.spec.model_size,
            progress=self._download_progress,
        )
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="llama-server-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a free port taken by someone else before the server binds
            port = self.spec.port or _free_port(self.spec.host)
            try:
                await self._start_process(port)
                break
            except LaunchError:
                if self.spec.port or attempt == 2 or "bind" not in self.log_tail().lower():
                    raise
        self._emit("started", {"pid": self.pid})

    async def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM and a grace period, or at once with `kill`. Idempotent.

        The stop is under way before the first await: a cancellation while waiting for it
        (a flow's timeout, an anyio scope) does not leave the server running."""
        keeper = self._begin_stop(kill=kill)
        if keeper is None:
            return
        try:
            await asyncio.to_thread(keeper.wait, 30)
        except subprocess.TimeoutExpired:  # the keeper itself is stuck: the kernel finishes it
            keeper.kill()
            await asyncio.to_thread(keeper.wait)
        if keeper.stdout:
            keeper.stdout.close()

    def _begin_stop(self, *, kill: bool = False) -> subprocess.Popen | None:
        """Tell the keeper to stop the server (no await): EOF, after a `kill` line for at once."""
        keeper, self.keeper = self.keeper, None
        if keeper is None:
            return None
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            if kill:
                keeper.stdin.write(b"kill\n")
                keeper.stdin.flush()
            keeper.stdin.close()  # EOF: the keeper stops the server
        return keeper

    async def restart(self, reason: str) -> None:
        """Stop at once and start again on the same port; counts against the restart budget."""
        self.restarts.append(time.monotonic())
        self._emit("restarting", {"reason": reason, "restarts": len(self.restarts)})
        logger.warning("Restarting llama-server", server=self.label, reason=reason)
        await self.stop(kill=True)
        await self._start_process(self.port)
        self._emit("restarted", {"reason": reason, "pid": self.pid})

    def may_restart(self) -> bool:
        window = self.spec.restart.window
        while self.restarts and time.monotonic() - self.restarts[0] > window:
            self.restarts.popleft()
        return len(self.restarts) < self.spec.restart.max_restarts

    # -- watching --------------------------------------------------------------------------

    async def watch(self, check: Check | None = None) -> None:
        """Check every `check_interval` s; restart a crashed or wedged server while the budget
        lasts, then give up (the server stays down; the caller sees it as any outage)."""
        policy = self.spec.restart
        check = check or default_check
        strikes = 0
        while True:
            await asyncio.sleep(policy.check_interval)
            if not self.running:
                reason = f"its process exited ({self._exit_code()})"
            else:
                try:
                    status = await check(self)
                except Exception as exc:  # a faulty check must not end the watching
                    logger.error("Health check failed", server=self.label, error=repr(exc))
                    continue
                bad = status.state == ServerState.WEDGED
                strikes = strikes + 1 if bad else 0
                if strikes < policy.failed_checks:
                    continue
                reason = f"wedged {strikes} checks in a row: {status.error}"
            strikes = 0
            if not self.may_restart():
                self._emit("gave_up", {"reason": reason, "restarts": len(self.restarts)})
                logger.error(
                    "llama-server stays down: restart budget spent",
                    server=self.label,
                    reason=reason,
                    max_restarts=policy.max_restarts,
                    window_s=policy.window,
                )
                return
            try:
                await self.restart(reason)
            except LlamaCppError as exc:  # it did not come back: the next check tries again
                logger.error("llama-server did not restart", server=self.label, error=str(exc))

    # -- internals -------------------------------------------------------------------------

    async def _start_process(self, port: int) -> None:
        self.port = port
        if await asyncio.to_thread(_listening, self.spec.host, port):
            # A server already there would answer our readiness checks for ours.
            raise LaunchError(
                f"port {port} on {self.spec.host} is already in use: give the launch spec "
                "another port, or port 0 for a free one"
            )
        self.log_path = self.log_dir / f"llama-server-{port}-{os.getpid()}.log"
        command = server_command(self.spec, self.binary, self.model_path, port)
        # Not in a thread: a cancellation there would lose the keeper, and with it the server.
        self.keeper = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec, milliseconds
            [sys.executable, "-I", str(_KEEPER), str(self.log_path), "--", *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=server_env(self.spec),
            start_new_session=True,  # a Ctrl-C or a kill of our group reaches us, we stop it
        )
        try:
            line = await asyncio.to_thread(self.keeper.stdout.readline)
            self.pid = int(line) if line.strip().isdigit() else None
            logger.info("Started llama-server", server=self.label, pid=self.pid, log=self.log_path)
            await self._wait_ready()
        except BaseException:
            keeper = self._begin_stop(kill=True)
            if keeper is not None:
                await asyncio.shield(asyncio.to_thread(keeper.wait, 30))
            raise

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout
        started = time.monotonic()
        said = 0.0
        delay = _POLL_FIRST
        async with LlamaCppClient(self.root, timeout=5, api_key=self.spec.api_key) as client:
            while True:
                if not self.running:
                    raise LaunchError(
                        f"llama-server exited with code {self._exit_code()} while starting "
                        f"({self.binary}, model {self.model_path}, port {self.port}); its log "
                        f"says why:\n{self.log_tail()}"
                    )
                try:
                    await client.get_health()
                    await asyncio.sleep(_POLL_FIRST)
                    if not self.running:  # the answer came from another process's server
                        continue
                    logger.info(
                        "llama-server is ready",
                        server=self.label,
                        seconds=round(time.monotonic() - started, 2),
                    )
                    return
                except ServerLoadingError:
                    if time.monotonic() - said >= 10:
                        said = time.monotonic()
                        logger.info(
                            "llama-server is loading its model",
                            server=self.label,
                            seconds=round(said - started),
                        )
                except LlamaCppError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"llama-server {self.label} was not ready within "
                        f"{self.spec.ready_timeout:g} s (raise the launch spec's ready_timeout "
                        f"for a large model)\n{self.log_tail()}"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        try:
            self.on_event(kind, self, detail)
        except Exception as exc:  # the caller's hook: its fault must not stop the watching
            logger.error("Event hook failed", server=self.label, event=kind, error=repr(exc))

    def _exit_code(self) -> int | None:
        return self.keeper.poll() if self.keeper is not None else None

    def _download_progress(self, done: int, total: int) -> None:
        share = f" of {total / 1e6:.0f} MB" if total else ""
        logger.info("Downloading model", model=self.spec.model_id, mb=round(done / 1e6), of=share)

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except (OSError, AttributeError):
            return "(no server log)"
        return f"--- {self.log_path} (tail) ---\n" + "\n".join(lines)


async def default_check(server: ManagedServer) -> ProviderHealthStatus:
    """The health flow's check, canary included, with the restart policy's deadlines."""
    policy = server.spec.restart
    canary = CanaryOptions(
        first_byte_timeout=policy.first_byte_timeout,
        total_timeout=policy.first_byte_timeout * 3,
        progress_interval=2.0,
    )
    return await llamacpp_health_check(
        server.settings(timeout=policy.first_byte_timeout), canary=canary
    )


@contextlib.asynccontextmanager
async def llamacpp_server(
    spec: LaunchSpec | dict[str, Any],
    *,
    on_event: OnEvent | None = None,
    check: Check | None = None,
    log_dir: Path | None = None,
) -> AsyncIterator[ManagedServer]:
    """Start a llama-server from `spec`, yield it ready (`.settings()`, `.base_url`), watch and
    restart it per `spec.restart`, and stop it on exit, whatever ends the block."""
    server = ManagedServer(LaunchSpec.model_validate(spec), on_event=on_event, log_dir=log_dir)
    watcher = None
    try:
        await server.start()
        if server.spec.restart.check_interval:
            watcher = asyncio.create_task(server.watch(check), name=f"watch {server.label}")
        yield server
    finally:
        # The stop starts before any await, and the waits are shielded: a cancel scope that
        # cancels again at every await (a flow's timeout) still gets the server stopped.
        if watcher is not None:
            watcher.cancel()
        keeper = server._begin_stop()
        with anyio.CancelScope(shield=True):
            if watcher is not None:
                await asyncio.gather(watcher, return_exceptions=True)
            server.keeper = keeper  # the watcher's restart may have started one: its own
            await server.stop()  # except handler stopped that; this waits for ours
            server._emit("stopped", {})


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port (as this machine reaches it)."""
    if listens_everywhere(host):
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return sock.getsockname()[1]
