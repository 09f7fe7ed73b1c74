"""The shared field list as a form sees it: plain inputs, human titles, constraints a UI can check."""

from __future__ import annotations

import re

import httpx
import pytest
import respx
from pydantic import SecretStr, ValidationError

from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import BASE_URL_PATTERN, LlamaCppConnection, LlamaCppSettings
from tests.conftest import SECRET_KEY

SCHEMA = LlamaCppConnection.model_json_schema()
FIELDS = SCHEMA["properties"]


def test_every_field_has_one_plain_type_a_human_title_and_a_description():
    assert {name: field["title"] for name, field in FIELDS.items()} == {
        "base_url": "Base URL",
        "api_key": "API key",
        "timeout": "Timeout (seconds)",
        "model_name": "Model name",
    }
    for name, field in FIELDS.items():
        # `anyOf` (an optional) is what makes Prefect's new UI show a type toggle and no input.
        assert "anyOf" not in field and field["type"] in ("string", "number"), name
        assert field["description"].endswith("."), name
    assert FIELDS["api_key"]["format"] == "password" and FIELDS["api_key"]["writeOnly"] is True
    assert FIELDS["api_key"]["default"] == "" and FIELDS["model_name"]["default"] == ""
    assert FIELDS["timeout"]["exclusiveMinimum"] == 0


def test_an_empty_or_absent_key_sends_no_key():
    for given in ({}, {"api_key": ""}, {"api_key": "   "}, {"api_key": None}):
        settings = LlamaCppSettings(**given)
        assert settings.api_key_value() is None
        assert settings.api_key.get_secret_value() == ""


@respx.mock
async def test_a_client_built_from_an_empty_key_sends_no_authorization_header():
    route = respx.get("http://gpu-1:8080/health").mock(
        return_value=httpx.Response(200, json={"status": "ok"})
    )
    settings = LlamaCppSettings(base_url="http://gpu-1:8080/v1", api_key="")
    async with LlamaCppClient(settings.base_url, api_key=settings.api_key) as client:
        await client.get_health()
    assert "authorization" not in route.calls.last.request.headers


def test_values_saved_as_null_by_the_earlier_optional_fields_still_load():
    loaded = LlamaCppConnection.model_validate(
        {"base_url": "http://gpu-1:8080", "api_key": None, "timeout": 5, "model_name": None}
    )
    assert loaded.api_key_value() is None and loaded.model_name == ""


def test_the_key_is_trimmed_and_shown_nowhere():
    settings = LlamaCppSettings(api_key=SecretStr(f"  {SECRET_KEY}\n"))
    assert settings.api_key_value() == SECRET_KEY
    assert (
        SECRET_KEY not in repr(settings) + str(settings.model_dump()) + settings.model_dump_json()
    )


@pytest.mark.parametrize("timeout", [0, -5, "nan"])
def test_a_timeout_must_be_more_than_zero(timeout):
    with pytest.raises(ValidationError, match="timeout"):
        LlamaCppSettings(timeout=timeout)


# What `parse_server_url` accepts (tests/unit/test_server_url.py) and what it refuses.
ACCEPTED = [
    "http://localhost:8080",
    "http://localhost:8080/v1//",
    "  https://gw.example.com/llama/v1  ",
    "http://[::1]:8080/v1",
    "HTTP://host:8080/V1/",
    "http://host/proxy/v10",
    "http://h/v1?",
    "http://h/a@b",
    "https://gw.example.com/llama/v1\n",
]
REFUSED_BY_BOTH = [
    "",
    "not a url",
    "localhost:8080",
    "ftp://host/v1",
    "http://",
    "//host:8080",
    "http:///v1",
    "http://admin:hunter2@host/v1",
    "http://host/v1?api_key=hunter2",
    "http://host/v1#x",
    "http://host/v1;key=hunter2",
    "http://exa mple.com/v1",
]


@pytest.mark.parametrize("url", ACCEPTED)
def test_the_form_pattern_never_refuses_a_url_the_validator_accepts(url):
    LlamaCppConnection(base_url=url)
    # JSON Schema's `pattern` is a search (ECMA-262); anchored here, so `search` is the same.
    assert re.search(BASE_URL_PATTERN, url)


@pytest.mark.parametrize("url", REFUSED_BY_BOTH)
def test_the_form_pattern_refuses_urls_the_validator_refuses(url):
    with pytest.raises(ValidationError):
        LlamaCppConnection(base_url=url)
    assert not re.search(BASE_URL_PATTERN, url)
