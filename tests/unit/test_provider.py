from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import respx
from pydantic_ai.models.openai import OpenAIChatModel

from prefect_llamacpp import (
    LlamaCppProvider,
    create_llamacpp_model,
    create_llamacpp_model_async,
    detect_llamacpp_model,
    llamacpp_health_check,
)
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.exceptions import (
    ConfigurationError,
    LlamaCppError,
    ModelError,
    ServerHTTPError,
    ServerNotReadyError,
)
from prefect_llamacpp.log import get_logger_with_context
from prefect_llamacpp.provider import PLACEHOLDER_API_KEY, llamacpp_model_profile
from tests.conftest import SECRET_KEY
from tests.unit.fakes import LOADING, MODELS, ROOT, UNAUTHORIZED, ready_server

REPO = Path(__file__).resolve().parents[2]


def test_model_needs_no_server_and_uses_the_openai_base():
    model = create_llamacpp_model(
        model_name="qwen3", settings=LlamaCppSettings(base_url="http://gpu-1:8080")
    )
    assert isinstance(model, OpenAIChatModel)
    assert model.model_name == "qwen3"
    assert model.system == "llamacpp"
    assert str(model.client.base_url).rstrip("/") == "http://gpu-1:8080/v1"
    assert model.client.api_key == PLACEHOLDER_API_KEY


def test_model_sends_the_configured_key():
    model = create_llamacpp_model(settings=LlamaCppSettings(api_key="k1"))
    assert model.client.api_key == "k1"


def test_provider_falls_back_to_env(monkeypatch):
    monkeypatch.setenv("LLAMACPP_BASE_URL", "http://envhost:1234/")
    monkeypatch.setenv("LLAMACPP_API_KEY", "envkey")
    provider = LlamaCppProvider()
    assert provider.name == "llamacpp"
    assert provider.base_url.rstrip("/") == "http://envhost:1234/v1"
    assert provider.client.api_key == "envkey"
    assert "envkey" not in repr(provider)


def test_provider_rejects_bad_url():
    with pytest.raises(ConfigurationError, match="http://localhost:8080"):
        LlamaCppProvider(base_url="localhost:8080")


def test_profile_says_json_schema_is_grammar_enforced():
    profile = llamacpp_model_profile("Qwen3-8B-Q4_K_M.gguf")
    assert profile["supports_json_schema_output"] is True
    assert profile["supports_json_object_output"] is True
    assert profile["native_output_requires_schema_in_instructions"] is True
    assert llamacpp_model_profile("anything")["supports_json_schema_output"] is True
    model = create_llamacpp_model("qwen3-8b")
    assert model.profile["supports_json_schema_output"] is True


@respx.mock
async def test_async_model_uses_detected_id():
    ready_server(respx)
    model = await create_llamacpp_model_async(settings=LlamaCppSettings(base_url=ROOT))
    assert model.model_name == "qwen3-0.6b-q8_0.gguf"


@respx.mock
async def test_async_model_explicit_name_wins():
    ready_server(respx)
    model = await create_llamacpp_model_async("mine", settings=LlamaCppSettings(base_url=ROOT))
    assert model.model_name == "mine"


@respx.mock
async def test_async_model_without_connection_test_detects():
    respx.get(f"{ROOT}/v1/models").respond(200, json=MODELS)
    model = await create_llamacpp_model_async(
        settings=LlamaCppSettings(base_url=ROOT), test_connection=False
    )
    assert model.model_name == "qwen3-0.6b-q8_0.gguf"


@respx.mock
async def test_async_model_refuses_a_loading_server():
    respx.get(f"{ROOT}/health").mock(return_value=LOADING)
    with pytest.raises(ServerNotReadyError, match="still loading the model") as info:
        await create_llamacpp_model_async(settings=LlamaCppSettings(base_url=ROOT))
    assert info.value.details["state"] == info.value.last_state == "loading"
    assert info.value.transient


@respx.mock
async def test_detect_errors_carry_status_and_url():
    respx.get(f"{ROOT}/v1/models").respond(500, json={"error": {"message": "kaput"}})
    with pytest.raises(ModelError, match="kaput") as info:
        await detect_llamacpp_model(ROOT)
    assert isinstance(info.value.__cause__, ServerHTTPError)  # the cause is kept
    assert info.value.details["status_code"] == 500
    assert info.value.details["url"] == f"{ROOT}/v1/models"


@respx.mock
async def test_detect_connection_error():
    respx.get(f"{ROOT}/v1/models").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ModelError, match="cannot reach") as info:
        await detect_llamacpp_model(ROOT, timeout=1)
    assert info.value.details["url"] == f"{ROOT}/v1/models"


@respx.mock
async def test_detect_returns_none_when_nothing_listed():
    respx.get(f"{ROOT}/v1/models").respond(200, json={"object": "list", "data": []})
    assert await detect_llamacpp_model(ROOT) is None


@respx.mock
async def test_key_never_leaks_into_logs_errors_or_status(caplog):
    """Every path that touches the key, searched for it afterwards."""
    caplog.set_level(logging.DEBUG)
    settings = LlamaCppSettings(base_url=ROOT, api_key=SECRET_KEY)
    captured: list[str] = [repr(settings), str(settings), settings.model_dump_json()]

    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").mock(return_value=UNAUTHORIZED)
    respx.get(f"{ROOT}/v1/models").mock(return_value=UNAUTHORIZED)
    status = await llamacpp_health_check(settings)
    captured += [status.model_dump_json(), repr(status)]
    for call in (
        lambda: create_llamacpp_model_async(settings=settings),
        lambda: detect_llamacpp_model(ROOT, api_key=SECRET_KEY),
    ):
        with pytest.raises(LlamaCppError) as info:
            await call()
        captured += [str(info.value), repr(info.value), repr(info.value.details)]
        captured += [str(info.value.__cause__), repr(info.value.__cause__)]
    model = create_llamacpp_model(settings=settings)
    captured += [repr(model), repr(model._provider)]
    captured.append(caplog.text)
    assert status.state == "unauthorized"
    assert all(SECRET_KEY not in text for text in captured)
    # ...and the key did go out, so the search above was not vacuous.
    assert respx.calls.last.request.headers["authorization"] == f"Bearer {SECRET_KEY}"


def test_context_logger(caplog):
    caplog.set_level(logging.INFO)
    logger = get_logger_with_context("test", server="http://h:1")
    logger.info("Detected model", model_id="m1")
    record = caplog.records[-1]
    assert record.name == "prefect_llamacpp.test"
    assert record.getMessage() == "Detected model server=http://h:1 model_id=m1"
    assert record.llamacpp_context == {"server": "http://h:1", "model_id": "m1"}


# The seed's five success commands, run from the repository root as the seed runs them: their
# output is a contract with the code that uses this library (OpenAIChatModel stands for the
# seed's OpenAIModel, which pydantic-ai renamed).
COMMANDS = [
    (
        "from src.core.models.llamacpp_provider import create_llamacpp_model, llamacpp_health_check; print('Imports OK')",
        "Imports OK",
    ),
    (
        "from src.infrastructure.llm.llamacpp_client import LlamaCppClient; print('Client OK')",
        "Client OK",
    ),
    (
        "from src.core.models.llamacpp_provider import create_llamacpp_model; m = create_llamacpp_model(model_name='test'); print(type(m).__name__)",
        "OpenAIChatModel",
    ),
    (
        "import asyncio; from src.core.models.llamacpp_provider import llamacpp_health_check; h = asyncio.run(llamacpp_health_check()); print(f'connected={h.connected}, provider={h.provider_type}')",
        "connected=False, provider=llamacpp",
    ),
    (
        "from src.core.models import create_llamacpp_model, llamacpp_health_check; print('Package exports OK')",
        "Package exports OK",
    ),
]


@pytest.mark.parametrize(("code", "expected"), COMMANDS)
def test_readme_one_liners(code, expected, tmp_path):
    # No server on 8080 is assumed by the fourth command; point it at a port with nothing on it
    # only if something does listen on 8080 here.
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("LLAMACPP_")}
    if _port_open(8080):
        env["LLAMACPP_BASE_URL"] = "http://127.0.0.1:9/v1"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
