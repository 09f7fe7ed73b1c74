"""Flows run from a terminal without a Prefect server: the temporary API server gets time to
start on a busy machine, and when it still does not, the command says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from prefect_llamacpp.flows.local_api import STARTUP_TIMEOUT_S, local_prefect_api

REPO = Path(__file__).resolve().parents[2]


def test_the_temporary_api_server_gets_longer_to_start_unless_the_user_chose():
    with temporary_settings(
        updates={PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 20}
    ):
        with local_prefect_api():
            assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == STARTUP_TIMEOUT_S
        assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == 20
    with temporary_settings(
        updates={PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 7}
    ):
        with local_prefect_api():
            assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == 7
    with temporary_settings(
        updates={
            PREFECT_API_URL: "http://127.0.0.1:9/api",
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 20,
        }
    ):
        with local_prefect_api():
            assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == 20


def test_a_temporary_api_server_that_does_not_start_is_explained_not_a_traceback(tmp_path):
    # One second is too short for any machine: the failure the CLI meets on a saturated one.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LLAMACPP_"))}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1",
        "PYTHONPATH": str(REPO),
    }
    for command in (["-m", "flows.health"], ["-m", "flows.batch", "in.jsonl", "out.jsonl"]):
        (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "hi"}\n')
        result = subprocess.run(
            [sys.executable, *command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert "prefect server start" in result.stderr
        assert "PREFECT_API_URL=http://127.0.0.1:4200/api" in result.stderr
        assert "Traceback" not in result.stderr
