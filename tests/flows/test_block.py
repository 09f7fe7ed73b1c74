from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentCreate
from prefect.settings import PREFECT_API_URL
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from prefect_llamacpp.blocks import LlamaCppServer
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppConnection, LlamaCppSettings
from prefect_llamacpp.flows.health import llamacpp_health_flow
from tests.conftest import SECRET_KEY
from tests.flows.conftest import flow_run_record

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


@pytest.mark.parametrize("source", [["-f", "blocks/llamacpp.py"], ["-m", "prefect_llamacpp"]])
def test_register_cli(prefect_harness, source):
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", *source],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llama.cpp Server" in result.stdout


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks in `text`, dedented, in order."""
    return [
        inspect.cleandoc(block) for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)
    ]


def the_example() -> str:
    (example,) = python_blocks(LlamaCppServer._code_example)
    return example


def test_one_example_in_the_docstring_the_code_example_and_the_readme():
    example = the_example()
    assert python_blocks(LlamaCppServer.__doc__) == [example]
    assert example in python_blocks((REPO / "README.md").read_text())
    assert LlamaCppServer.get_code_example().count('LlamaCppServer.load("BLOCK_NAME")') == 1


@pytest.mark.integration
def test_the_example_runs_against_a_real_server(server, prefect_harness):
    LlamaCppServer(base_url=server.openai_base).save("example-block", overwrite=True)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    result = subprocess.run(
        [sys.executable, "-c", the_example().replace("BLOCK_NAME", "example-block")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip(), "the example printed no answer"


async def save_raw_block(name: str, data: dict) -> None:
    """Save `data` as a block document as the API takes it: unvalidated, like a form or a script
    that posts to /block_documents/ directly."""
    async with get_client() as api:
        block_type = await api.read_block_type_by_slug("llamacpp-server")
        schema = await api.get_most_recent_block_schema_for_block_type(block_type.id)
        await api.create_block_document(
            BlockDocumentCreate(
                name=name, data=data, block_type_id=block_type.id, block_schema_id=schema.id
            )
        )


@pytest.mark.parametrize(
    ("name", "data", "named"),
    [
        (
            "saved-bad-url",
            {"base_url": "not a url", "api_key": SECRET_KEY, "timeout": -5, "model_name": ""},
            [
                "Base URL [base_url]: 'not a url' is not a valid llama.cpp server URL",
                "Timeout (seconds) [timeout]: Input should be greater than 0",
            ],
        ),
        (
            "saved-broken-key",
            {"base_url": "http://127.0.0.1:9/v1", "api_key": f"{SECRET_KEY}\nx", "timeout": 5},
            ["API key [api_key]: the API key contains a line break"],
        ),
    ],
)
async def test_a_block_saved_with_invalid_values_fails_the_flow_naming_the_field(
    registered_block_type, name, data, named
):
    await save_raw_block(name, data)
    state = await llamacpp_health_flow(name, return_state=True)
    assert state.is_failed()
    assert f"The llama.cpp Server block {name!r} is saved with invalid values" in state.message
    for words in named:
        assert words in state.message
    assert "fix them in the Prefect UI" in state.message
    record = await flow_run_record(state.state_details.flow_run_id)
    assert SECRET_KEY not in record["text"] + state.message + str(state)
