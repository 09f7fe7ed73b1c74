"""The alert automations end to end: a real `prefect server start`, real llama-server, real webhook.

Everything runs on 127.0.0.1: a Prefect server with its automation services (its own home and
SQLite database), a llama-server with an API key, and a small HTTP receiver standing in for the
webhook. The automations are created from `automations/llamacpp-alerts.yaml` by the installer,
which runs `prefect automation create --from-file`; the health flow runs as a separate
process, as a deployment would run it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client

from harness.prefect_server import prefect_server as start_prefect_server
from harness.prefect_server import talking_to
from harness.server import LlamaServer
from prefect_llamacpp.blocks import LlamaCppServer
from tests.conftest import SECRET_KEY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WINDOW_S = 10  # the proactive automation's window in this test (15 minutes in the file)


class Receiver:
    """A webhook endpoint that keeps every request it gets (path, headers, body)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(
                    {
                        "at": time.time(),
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body.decode("utf-8", "replace"),
                    }
                )
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def wait_for(self, pattern: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for request in list(self.requests):
                if re.search(pattern, request["body"]):
                    return request
            time.sleep(0.2)
        bodies = [r["body"] for r in self.requests]
        raise AssertionError(f"no notification matching {pattern!r} in {timeout} s; got {bodies}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free 127.0.0.1 port, services on, UI off; its API URL."""
    with start_prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server.api


def run(api: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def test_alerts_reach_the_webhook_and_never_carry_the_key(
    prefect_server, llama_server_bin, tiny_model, tmp_path
):
    receiver = Receiver()
    llama = LlamaServer(
        tiny_model,
        ["--alias", "tiny-e2e", "--api-key", SECRET_KEY, "--metrics"],
        binary=llama_server_bin,
        log_dir=tmp_path,
    ).start()
    try:
        with talking_to(prefect_server):
            await CustomWebhookNotificationBlock(
                name="llamacpp-alerts",
                url=receiver.url,
                json_data={"subject": "{{subject}}", "text": "{{body}}"},
            ).save("e2e-hook")
            await LlamaCppServer(base_url=llama.openai_base, api_key=SECRET_KEY, timeout=5).save(
                "e2e-llama"
            )

        installed = run(
            prefect_server,
            "-m",
            "automations.install",
            "--notify",
            "custom-webhook/e2e-hook",
            "--window",
            str(WINDOW_S),
            "--replace",
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "Created 2 automation(s)" in installed.stdout
        with talking_to(prefect_server):
            async with get_client() as client:
                names = {a.name for a in await client.read_automations()}
        assert names == {"llamacpp-server-unhealthy", "llamacpp-server-silent"}

        # Ready: no alert, and the proactive window for this server opens.
        ready = run(prefect_server, "-m", "flows.health", "e2e-llama")
        assert ready.returncode == 0, ready.stdout + ready.stderr

        # Stopped: the reactive automation notifies, naming the server.
        llama.stop()
        down = run(prefect_server, "-m", "flows.health", "e2e-llama")
        reported_at = time.time()  # the event is sent by then (a start-up is not the alert's)
        assert down.returncode == 1, down.stdout + down.stderr
        alert = receiver.wait_for(r"llama\.cpp server e2e-llama is unreachable", timeout=90)
        assert alert["at"] - reported_at < 60
        text = json.loads(alert["body"])["text"]
        assert "cannot reach llama-server" in text and llama.url in text

        # Silence: no healthy report within the window, so the proactive automation fires,
        # and not before the window has passed since the ready report that opened it.
        silent = receiver.wait_for(r"e2e-llama: no healthy report", timeout=WINDOW_S + 60)
        opened = re.search(
            r"window opened with llamacpp\.server\.ready at "
            r"(\d{4}-\d\d-\d\d[ T][\d:.]+(?:[+-]\d\d:\d\d|Z)?)",
            json.loads(silent["body"])["text"],
        )
        assert opened, silent["body"]
        opened_at = datetime.fromisoformat(opened.group(1).replace("Z", "+00:00"))
        assert silent["at"] >= opened_at.timestamp() + WINDOW_S

        everything = json.dumps(receiver.requests)
        assert SECRET_KEY not in everything
        assert receiver.requests and all(r["path"] == "/hook" for r in receiver.requests)
    finally:
        llama.stop()
        receiver.http.shutdown()
