"""A real `prefect server start` on 127.0.0.1 for the end-to-end and browser tests and the
benchmarks.

Its own home and SQLite database, analytics off, started as a user would start it, stopped (the
whole process group) at the end. With `ui=True` it serves both Prefect UIs: the new one under
`/v2` and the classic one at the root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.server import free_port

START_TIMEOUT_S = 180  # measured 20 to 45 s on the shared 2-core machine


@dataclass(frozen=True)
class PrefectServer:
    url: str
    """The server root, e.g. http://127.0.0.1:4321 (the classic UI is served here)."""
    home: Path

    @property
    def api(self) -> str:
        return f"{self.url}/api"


@contextmanager
def prefect_server(
    home: Path, *, ui: bool = False, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[PrefectServer]:
    """Start one; `env`: more settings for it (e.g. a service's loop interval); `port`: where
    (default: a free one)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true" if ui else "false",
        # The UI asks the API at this address (else the default port 4200, not ours).
        "PREFECT_UI_API_URL": f"{url}/api",
        **(env or {}),
    }
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--analytics-off"] + ([] if ui else ["--no-ui"])
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                assert process.poll() is None, log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (
                    f"prefect server did not start in {START_TIMEOUT_S} s; log: {log_path}"
                )
                time.sleep(0.3)
            yield PrefectServer(url=url, home=home)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    # The server runs its services in child processes: stop the group it leads.
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def drain_events(timeout: float = 30) -> None:
    """Send this process's queued Prefect events, then stop the worker that sends them.

    Prefect keeps one events worker per process, bound to the API it first saw; the next
    `instance()` after a drain is a new worker bound to the API set then. Drained on a thread of
    its own so that it blocks even when an event loop runs on the caller's thread.
    """
    from prefect.events.worker import EventsWorker

    worker = threading.Thread(target=EventsWorker.drain_all, kwargs={"timeout": timeout})
    worker.start()
    worker.join()


@contextmanager
def talking_to(api: str) -> Iterator[None]:
    """This process's Prefect client, events included, on `api` for the block's duration.

    `temporary_settings` alone moves the client but not the events worker: left bound to a
    server the test then stops, it makes every later flow in the session wait minutes on exit
    trying to deliver to it.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    drain_events()
    with temporary_settings({PREFECT_API_URL: api}):
        try:
            yield
        finally:
            drain_events()
