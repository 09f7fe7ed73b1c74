"""prefect.yaml: valid for Prefect's own models, and `prefect deploy --all` accepts it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.orchestration import get_client
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL

REPO = Path(__file__).resolve().parents[2]


def load_config() -> PrefectYamlModel:
    return PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))


def test_prefect_yaml_is_valid_and_its_flows_take_its_parameters():
    config = load_config()
    deployments = {d.name: d for d in config.deployments}
    assert set(deployments) == {
        "llamacpp-health",
        "llamacpp-batch",
        "llamacpp-batch-s3",
        "llamacpp-batch-shards",
        "llamacpp-batch-launch",
        "llamacpp-managed-server",
    }
    health = deployments["llamacpp-health"]
    assert health.schedules[0].interval.total_seconds() == 300
    assert (
        health.work_pool.name == deployments["llamacpp-batch"].work_pool.name == "llamacpp-process"
    )
    assert not deployments["llamacpp-batch"].schedules
    for deployment in deployments.values():
        flow = load_flow_from_entrypoint(str(REPO / deployment.entrypoint))
        flow.validate_parameters(deployment.parameters)  # raises on a wrong name or type
    assert (REPO / deployments["llamacpp-batch"].parameters["input_path"]).is_file()


def _prefect(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PWD": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


async def test_prefect_deploy_all_creates_every_deployment(prefect_harness):
    created = _prefect("work-pool", "create", "llamacpp-process", "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    urls = {
        "llamacpp_batch_input": "s3://my-bucket/jobs/prompts.jsonl",
        "llamacpp_batch_output": "s3://my-bucket/results/prompts.out.jsonl",
    }
    for name, url in urls.items():
        assert _prefect("variable", "set", name, url, "--overwrite").returncode == 0
    deployed = _prefect("deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    async with get_client() as client:
        health = await client.read_deployment_by_name("llamacpp-health/llamacpp-health")
        batch = await client.read_deployment_by_name("llamacpp-batch/llamacpp-batch")
        on_s3 = await client.read_deployment_by_name("llamacpp-batch/llamacpp-batch-s3")
        sharded = await client.read_deployment_by_name("llamacpp-batch/llamacpp-batch-shards")
        launched = await client.read_deployment_by_name("llamacpp-batch/llamacpp-batch-launch")
        managed = await client.read_deployment_by_name(
            "llamacpp-managed-server/llamacpp-managed-server"
        )
    assert launched.parameters["launch"] == "llamacpp" and "server" not in launched.parameters
    assert managed.parameters == {"launch": "llamacpp", "server_block": "llamacpp"}
    assert sharded.parameters["run"] == {"shards": 3, "priority": 1}
    assert sharded.parameters["output_path"] == urls["llamacpp_batch_output"]
    assert on_s3.parameters["input_path"] == urls["llamacpp_batch_input"]
    assert on_s3.parameters["output_path"] == urls["llamacpp_batch_output"]
    assert on_s3.work_pool_name == "llamacpp-process"
    assert health.work_pool_name == "llamacpp-process"
    assert health.schedules[0].schedule.interval.total_seconds() == 300
    assert health.parameters == {"server": ["llamacpp"]}
    assert batch.parameters["input_path"] == "examples/prompts.jsonl"
    assert not batch.schedules
    assert health.pull_steps[0]["prefect.deployments.steps.set_working_directory"][
        "directory"
    ] == str(REPO)
