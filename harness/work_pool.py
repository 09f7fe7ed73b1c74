"""A process work pool with the batch flow deployed on it, and `prefect worker start` processes,
each in a working directory of its own with its own empty local disk (TMPDIR): separate nodes,
on one machine. For the sharding tests and benchmark.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BATCH_ENTRYPOINT = "prefect_llamacpp.flows.batch:llamacpp_batch_flow"


def node_env(api: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process on node `home`: the shared Prefect API, its own disk."""
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(home / "prefect-home"),
        "TMPDIR": str(home / "tmp"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **extra,
    }


def deploy_batch(api: str, project: Path, pool: str, name: str) -> str:
    """Create process pool `pool` and deploy the batch flow on it as `name` (`prefect deploy`,
    as a user would; the flow is imported from the installed package). Returns the deployment's
    full name, `llamacpp-batch/<name>`."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "prefect.yaml").write_text(
        f"name: {name}\n"
        "pull: []\n"
        "deployments:\n"
        f"  - name: {name}\n"
        f"    entrypoint: {BATCH_ENTRYPOINT}\n"
        f"    work_pool: {{name: {pool}}}\n"
    )
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    for command in (["work-pool", "create", pool, "--type", "process"], ["deploy", "--all"]):
        done = subprocess.run(
            prefect + command,
            cwd=project,
            env=node_env(api, project),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(command)}: {done.stdout[-2000:]}{done.stderr}")
    return f"llamacpp-batch/{name}"


@contextmanager
def worker(api: str, home: Path, pool: str, **env: str) -> Iterator[subprocess.Popen]:
    """A `prefect worker start` on node `home`, one flow run at a time, polling every second;
    its process group is killed at the end."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "worker.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--limit", "1"],
            cwd=home,
            env=node_env(api, home, PREFECT_WORKER_QUERY_SECONDS="1", **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed whole, as a node dies
        )
        try:
            yield process
        finally:
            kill_group(process.pid)
            process.wait(30)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
