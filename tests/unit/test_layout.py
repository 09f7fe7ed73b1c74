"""The one implementation and its other paths: the provider library imports without Prefect, the
seed's `src` paths are the package's own modules, and every public name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import prefect_llamacpp

REPO = Path(__file__).resolve().parents[2]
LIBRARY = [
    "provider",
    "client",
    "config",
    "status",
    "exceptions",
    "server_url",
    "log",
    "fast_json",
    "canary",
    "request",
    "embedding_probe",
    "launch",
    "model_cache",
    "managed",
    "batch.dispatch",
    "batch.jsonl_input",
    "batch.ledger",
    "batch.openai_output",
    "batch.records",
    "batch.runner",
    "storage",
]
SEED_PATHS = {
    "src.core.models.llamacpp_provider": "prefect_llamacpp.provider",
    "src.core.utils.config": "prefect_llamacpp.config",
    "src.core.utils.exceptions": "prefect_llamacpp.exceptions",
    "src.core.utils.logging": "prefect_llamacpp.log",
    "src.infrastructure.llm.llamacpp_client": "prefect_llamacpp.client",
    "src.core.models.canary": "prefect_llamacpp.canary",
    "src.core.models.embedding_probe": "prefect_llamacpp.embedding_probe",
    "src.core.models.llamacpp_request": "prefect_llamacpp.request",
    "src.core.utils.server_url": "prefect_llamacpp.server_url",
    "src.core.utils.fast_json": "prefect_llamacpp.fast_json",
    **{
        f"src.core.batch.{name}": f"prefect_llamacpp.batch.{name}"
        for name in ("dispatch", "jsonl_input", "ledger", "openai_output", "records", "runner")
    },
    # this repository's Prefect project: imported by name, the package's own modules
    "flows.health": "prefect_llamacpp.flows.health",
    "flows.batch": "prefect_llamacpp.flows.batch",
    "flows.managed_server": "prefect_llamacpp.flows.managed_server",
    "tasks.llamacpp": "prefect_llamacpp.tasks",
    "blocks.llamacpp": "prefect_llamacpp.blocks",
}


def test_the_provider_library_imports_without_prefect():
    imports = "; ".join(f"import prefect_llamacpp.{name}" for name in LIBRARY)
    code = f"import sys; {imports}; print(sorted(m for m in sys.modules if m.startswith('prefect.')) or 'none')"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


@pytest.mark.parametrize(("seed", "package"), SEED_PATHS.items())
def test_a_seed_path_is_the_packages_module_not_a_copy(seed, package):
    assert importlib.import_module(seed) is importlib.import_module(package)


def test_every_public_name_resolves_and_the_seed_exports_are_the_same_objects():
    for name in prefect_llamacpp.__all__:
        assert getattr(prefect_llamacpp, name) is not None, name
    assert set(prefect_llamacpp.__all__) <= set(dir(prefect_llamacpp))
    seed = importlib.import_module("src.core.models")
    for name in seed.__all__:
        assert getattr(seed, name) is getattr(prefect_llamacpp, name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        prefect_llamacpp.nothing  # noqa: B018


def test_a_project_entry_point_loaded_from_its_file_holds_the_flow():
    from prefect.flows import load_flow_from_entrypoint

    for entrypoint, name in (
        ("flows/health.py:llamacpp_health_flow", "llamacpp-health"),
        ("flows/batch.py:llamacpp_batch_flow", "llamacpp-batch"),
        ("flows/managed_server.py:llamacpp_managed_server_flow", "llamacpp-managed-server"),
    ):
        assert load_flow_from_entrypoint(str(REPO / entrypoint)).name == name
