"""Real llama-server processes for the integration and flow tests (a pytest plugin).

The binary comes from `harness.binary` (LLAMA_SERVER_BIN, PATH, or the cached build): if none can
be had the session fails, it never skips. Servers are session- or module-scoped and always stopped.
"""

from __future__ import annotations

import shutil

import pytest

from harness.binary import ensure_llama_server
from harness.models import ensure_model
from harness.server import LlamaServer
from src.core.utils.config import LlamaCppSettings
from tests.conftest import SECRET_KEY


@pytest.fixture(scope="session")
def llama_server_bin():
    return ensure_llama_server()


@pytest.fixture(scope="session")
def tiny_model():
    return ensure_model("tiny")


def _server(bin_path, model, args, tmp_path_factory):
    return LlamaServer(model, args, binary=bin_path, log_dir=tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="session")
def server(llama_server_bin, tiny_model, tmp_path_factory):
    """4 slots of 1024 tokens each, metrics on, alias `tiny`."""
    args = ["-np", "4", "-c", "4096", "--alias", "tiny", "--metrics"]
    with _server(llama_server_bin, tiny_model, args, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def key_server(llama_server_bin, tiny_model, tmp_path_factory):
    """Started with --api-key; no --metrics."""
    args = ["-np", "2", "--alias", "tiny-secure", "--api-key", SECRET_KEY]
    with _server(llama_server_bin, tiny_model, args, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def no_slots_server(llama_server_bin, tiny_model, tmp_path_factory):
    with _server(llama_server_bin, tiny_model, ["--no-slots"], tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="session")
def router_server(llama_server_bin, tiny_model, tmp_path_factory):
    """Router mode over two models, `alpha` and `beta`, none loaded at start."""
    models_dir = tmp_path_factory.mktemp("router-models")
    for name in ("alpha", "beta"):
        shutil.copy(tiny_model, models_dir / f"{name}.gguf")
    args = ["--models-dir", str(models_dir), "--models-max", "1"]
    with _server(llama_server_bin, None, args, tmp_path_factory) as running:
        yield running


def settings_for(server: LlamaServer, **overrides) -> LlamaCppSettings:
    return LlamaCppSettings(base_url=server.openai_base, timeout=10, **overrides)
