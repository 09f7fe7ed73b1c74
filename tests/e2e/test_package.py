"""The package as a user installs it: the wheel built from this checkout, installed into a fresh
virtual environment outside the repository, then used from there (no PYTHONPATH, another working
directory) against a real `prefect server start`, a real llama-server and a real process worker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from harness.models import ensure_model
from harness.prefect_server import prefect_server
from harness.server import LlamaServer

# Its own waits add up past the default 300 s on a loaded machine (set-up included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
PUBLIC_API = (
    "LlamaCppServer, llamacpp_health_flow, llamacpp_batch_flow, LlamaCppProvider, "
    "create_llamacpp_model, create_llamacpp_model_async, LlamaCppSettings, LlamaCppClient, "
    "LlamaCppError, ServerUnreachableError, BatchAbortedError"
)


def uv() -> list[str]:
    """The uv the README's commands use: $UV (as the Makefile passes it), else uv on PATH."""
    if os.environ.get("UV"):
        return shlex.split(os.environ["UV"])
    found = shutil.which("uv")
    if not found:
        pytest.fail("uv is needed to build the wheel: run the tests with `make test`")
    return [found]


def run(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300):
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a shell on a user's machine: none of this repository's settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "LLAMACPP_", "PYTHON", "VIRTUAL_ENV", "UV_"))
    }
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the built wheel in it; its bin directory."""
    work = tmp_path_factory.mktemp("package")
    dist = work / "dist"
    run([*uv(), "build", "--out-dir", str(dist)], cwd=REPO, env=clean_env())
    (wheel,) = dist.glob("prefect_llamacpp-*.whl")
    assert list(dist.glob("prefect_llamacpp-*.tar.gz")), "an sdist is built too"
    names = zipfile.ZipFile(wheel).namelist()
    assert all(name.startswith(("prefect_llamacpp/", "prefect_llamacpp-")) for name in names), [
        name for name in names if not name.startswith("prefect_llamacpp")
    ]
    assert not [name for name in names if name.endswith((".gguf", ".jsonl"))]
    assert "prefect_llamacpp/__init__.py" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "[prefect.collections]" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # The locked runtime dependencies (no dev ones), then the wheel: what `pip install` gives.
    requirements = work / "requirements.txt"
    exported = run(
        [*uv(), "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes"],
        cwd=REPO,
        env=clean_env(),
    )
    requirements.write_text(exported.stdout)
    venv = work / "venv"
    run([*uv(), "venv", str(venv), "--python", sys.executable], cwd=work, env=clean_env())
    python = str(venv / "bin" / "python")
    run(
        [*uv(), "pip", "install", "--python", python, "-r", str(requirements), str(wheel)],
        cwd=work,
        env=clean_env(),
        timeout=600,
    )
    return venv / "bin"


def test_the_wheel_installs_and_runs_flows_from_another_project(installed, tmp_path):
    elsewhere = tmp_path / "user-project"
    elsewhere.mkdir()
    env = clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"))

    # The public API, from the installed package (not this checkout), without Prefect for the
    # provider library alone.
    code = (
        f"import sys; from prefect_llamacpp import {PUBLIC_API}; import prefect_llamacpp; "
        "print(prefect_llamacpp.__file__)"
    )
    where = run([str(installed / "python"), "-c", code], cwd=elsewhere, env=env).stdout.strip()
    assert where.startswith(str(installed.parent)), where
    lean = "import sys, prefect_llamacpp.provider; print('prefect' in sys.modules)"
    assert run([str(installed / "python"), "-c", lean], cwd=elsewhere, env=env).stdout == (
        "False\n"
    )
    for name in ("src", "flows", "tasks", "blocks", "tests", "harness", "benchmarks"):
        probe = f"import importlib.util as u; print(u.find_spec({name!r}) is None)"
        found = run([str(installed / "python"), "-c", probe], cwd=elsewhere, env=env)
        assert found.stdout == "True\n", f"the wheel installed a top-level {name!r}"

    model = ensure_model("tiny")
    (tmp_path / "server-home").mkdir()
    with (
        prefect_server(tmp_path / "server-home") as server,
        LlamaServer(model, ["-np", "2", "--alias", "pkg-tiny"], log_dir=tmp_path) as llama,
    ):
        env["PREFECT_API_URL"] = server.api
        prefect = [str(installed / "prefect"), "--no-prompt"]
        registered = run(
            [*prefect, "block", "register", "-m", "prefect_llamacpp"], cwd=elsewhere, env=env
        )
        assert "llamacpp-server" in registered.stdout or "llama.cpp Server" in registered.stdout
        save = (
            "from prefect_llamacpp import LlamaCppServer; "
            f"LlamaCppServer(base_url={llama.openai_base!r}, timeout=10).save('pkg-llama')"
        )
        run([str(installed / "python"), "-c", save], cwd=elsewhere, env=env)

        # The two flows, through the console scripts the wheel installs.
        run([str(installed / "llamacpp-health"), "pkg-llama"], cwd=elsewhere, env=env)
        (elsewhere / "prompts.jsonl").write_text(
            "".join(
                json.dumps({"custom_id": f"p{i}", "prompt": f"Hi {i}"}) + "\n" for i in range(6)
            )
        )
        batch = run(
            [str(installed / "llamacpp-batch"), "prompts.jsonl", "out.jsonl"]
            + ["--server", "pkg-llama", "--max-tokens", "4"],
            cwd=elsewhere,
            env=env,
        )
        assert json.loads(batch.stdout)["succeeded"] == 6
        lines = [json.loads(line) for line in (elsewhere / "out.jsonl").read_text().splitlines()]
        assert sorted(line["custom_id"] for line in lines) == [f"p{i}" for i in range(6)]

        # The README's first example, as written (the server's address put in).
        readme = (REPO / "README.md").read_text()
        example = re.search(r"```python\n(.*?)```", readme, flags=re.S).group(1)
        assert "llamacpp_batch_flow(" in example
        (elsewhere / "readme_example.py").write_text(
            example.replace("http://gpu-1:8080/v1", llama.openai_base)
        )
        run([str(installed / "python"), "readme_example.py"], cwd=elsewhere, env=env)
        assert len((elsewhere / "results.jsonl").read_text().splitlines()) == 6

        # A project of the user's own: one file importing the flow, a prefect.yaml, a process
        # work pool, and a worker in a directory of its own (another node) that runs it.
        (elsewhere / "llm_flows.py").write_text(
            "from prefect_llamacpp import llamacpp_health_flow\n\n"
            '__all__ = ["llamacpp_health_flow"]\n'
        )
        (elsewhere / "prefect.yaml").write_text(
            "name: user-project\n"
            "pull:\n"
            "  - prefect.deployments.steps.set_working_directory:\n"
            f"      directory: {elsewhere}\n"
            "deployments:\n"
            "  - name: pkg-health\n"
            "    entrypoint: llm_flows.py:llamacpp_health_flow\n"
            "    parameters:\n"
            "      server: pkg-llama\n"
            "    work_pool:\n"
            "      name: pkg-pool\n"
        )
        run(
            [*prefect, "work-pool", "create", "pkg-pool", "--type", "process"],
            cwd=elsewhere,
            env=env,
        )
        run([*prefect, "deploy", "--all"], cwd=elsewhere, env=env)
        started = run(
            [*prefect, "deployment", "run", "llamacpp-health/pkg-health"], cwd=elsewhere, env=env
        )
        flow_run_id = next(
            line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line
        )
        node = tmp_path / "worker-node"
        node.mkdir()
        worker_env = {**env, "PREFECT_HOME": str(node / "prefect-home")}
        with open(node / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [*prefect, "worker", "start", "--pool", "pkg-pool", "--limit", "1"],
                cwd=node,
                env=worker_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            state = wait_for_final_state(server.api, flow_run_id, timeout=240)
        finally:
            os.killpg(worker.pid, 15)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:  # its shutdown is not under test; the run's state is
                os.killpg(worker.pid, 9)
                worker.wait(10)
        assert state == "COMPLETED", (node / "worker.log").read_text()[-3000:]


def wait_for_final_state(api: str, flow_run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(1)
    return f"still {state} after {timeout:g} s"
