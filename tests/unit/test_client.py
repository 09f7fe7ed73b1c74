from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
import respx

from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.exceptions import (
    NotSupportedError,
    ServerHTTPError,
    ServerLoadingError,
    ServerNotReadyError,
    ServerUnreachableError,
    UnauthorizedError,
    UnexpectedResponseError,
)
from tests.unit.fakes import LOADING, MODELS, PROPS, ROOT, UNAUTHORIZED

METRICS_TEXT = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 120
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 48
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""


def client(**kwargs) -> LlamaCppClient:
    return LlamaCppClient(f"{ROOT}/v1/", timeout=2, **kwargs)


def test_base_url_is_the_server_root():
    c = client(api_key=None)
    assert c.base_url == ROOT
    assert c.openai_base_url == f"{ROOT}/v1"


def test_settings_are_the_default(monkeypatch):
    monkeypatch.setenv("LLAMACPP_BASE_URL", "http://from-env:9/v1")
    from prefect_llamacpp.config import get_settings

    get_settings.cache_clear()
    assert LlamaCppClient().base_url == "http://from-env:9"


@respx.mock
async def test_one_http_client_is_reused_and_closed():
    respx.get(f"{ROOT}/props").respond(200, json=PROPS)
    async with client(api_key=None) as c:
        http = c._http
        await c.get_props()
        await c.get_props()
        assert c._http is http
    assert http.is_closed


@respx.mock
async def test_key_is_sent_as_bearer_and_hidden_from_repr():
    route = respx.get(f"{ROOT}/props").respond(200, json=PROPS)
    async with client(api_key="sk-abc") as c:
        await c.get_props()
        assert "sk-abc" not in repr(c)
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-abc"


@respx.mock
async def test_no_key_sends_no_authorization_header():
    route = respx.get(f"{ROOT}/props").respond(200, json=PROPS)
    async with client(api_key=None) as c:
        await c.get_props()
    assert "authorization" not in route.calls.last.request.headers


@respx.mock
async def test_slots_and_slots_disabled():
    respx.get(f"{ROOT}/slots").mock(
        side_effect=[
            httpx.Response(200, json=[{"id": 0, "n_ctx": 1024, "is_processing": False}]),
            httpx.Response(
                501,
                json={
                    "error": {
                        "message": "This server does not support slots endpoint.",
                        "type": "not_supported_error",
                        "code": 501,
                    }
                },
            ),
        ]
    )
    async with client(api_key=None) as c:
        assert (await c.get_slots())[0]["n_ctx"] == 1024
        with pytest.raises(NotSupportedError, match="--no-slots") as info:
            await c.get_slots()
    assert info.value.status_code == 501
    assert not info.value.transient


@respx.mock
async def test_metrics_are_parsed():
    respx.get(f"{ROOT}/metrics").respond(200, text=METRICS_TEXT)
    async with client(api_key=None) as c:
        metrics = await c.get_metrics()
    assert metrics["prompt_tokens_total"] == 120
    assert metrics["tokens_predicted_total"] == 48
    assert metrics["requests_processing"] == 2
    assert metrics["requests_deferred"] == 0


@respx.mock
async def test_metrics_disabled():
    respx.get(f"{ROOT}/metrics").respond(
        501, json={"error": {"message": "This server does not support metrics endpoint."}}
    )
    async with client(api_key=None) as c:
        with pytest.raises(NotSupportedError, match="--metrics"):
            await c.get_metrics()


@respx.mock
async def test_list_models_and_model_loaded():
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/v1/models").respond(200, json=MODELS)
    async with client(api_key=None) as c:
        assert [m["id"] for m in await c.list_models()] == ["qwen3-0.6b-q8_0.gguf"]
        assert await c.is_model_loaded()
        assert await c.is_model_loaded("qwen3-0.6b-q8_0.gguf")
        assert not await c.is_model_loaded("other")


@respx.mock
async def test_is_running():
    respx.get(f"{ROOT}/health").mock(
        side_effect=[
            httpx.Response(200, json={"status": "ok"}),
            LOADING,
            httpx.ConnectError("refused"),
        ]
    )
    async with client(api_key=None) as c:
        assert await c.is_running()
        assert await c.is_running()
        assert not await c.is_running()


@respx.mock
async def test_errors_are_typed():
    respx.get(f"{ROOT}/health").mock(
        side_effect=[
            LOADING,
            UNAUTHORIZED,
            httpx.Response(500, json={"error": {"message": "boom"}}),
            httpx.Response(200, text="<html/>", headers={"content-type": "text/html"}),
            httpx.ConnectError("refused"),
        ]
    )
    async with client(api_key=None) as c:
        with pytest.raises(ServerLoadingError) as loading:
            await c.get_health()
        assert loading.value.transient
        with pytest.raises(UnauthorizedError, match="requires an API key"):
            await c.get_health()
        with pytest.raises(ServerHTTPError, match="boom") as boom:
            await c.get_health()
        assert boom.value.details["status_code"] == 500
        with pytest.raises(UnexpectedResponseError, match="not JSON"):
            await c.get_health()
        with pytest.raises(ServerUnreachableError):
            await c.get_health()


@respx.mock
async def test_wait_until_ready_waits_through_refused_and_loading():
    route = respx.get(f"{ROOT}/health").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            LOADING,
            LOADING,
            httpx.Response(200, json={"status": "ok"}),
        ]
    )
    async with client(api_key=None) as c:
        assert await c.wait_until_ready(timeout=5, poll_interval=0.01) == {"status": "ok"}
    assert route.call_count == 4


@respx.mock
async def test_wait_until_ready_gives_up_at_deadline_saying_why():
    respx.get(f"{ROOT}/health").mock(return_value=LOADING)
    started = time.monotonic()
    async with client(api_key=None) as c:
        with pytest.raises(ServerNotReadyError, match="still loading the model") as info:
            await c.wait_until_ready(timeout=0.3, poll_interval=0.05)
    assert info.value.last_state == "loading"
    assert time.monotonic() - started < 2


@respx.mock
async def test_wait_until_ready_fails_fast_on_wrong_key():
    respx.get(f"{ROOT}/health").mock(return_value=UNAUTHORIZED)
    respx.get(f"{ROOT}/v1/models").mock(return_value=UNAUTHORIZED)
    async with client(api_key="wrong") as c:
        with pytest.raises(UnauthorizedError, match="rejected the API key"):
            await c.wait_until_ready(timeout=30)


@respx.mock
async def test_router_monitoring_never_autoloads():
    props = respx.get(f"{ROOT}/props").respond(200, json=PROPS)
    slots = respx.get(f"{ROOT}/slots").respond(200, json=[])
    metrics = respx.get(f"{ROOT}/metrics").respond(200, text=METRICS_TEXT)
    async with client(api_key=None) as c:
        await c.get_props(model="m1")
        await c.get_slots(model="m1")
        await c.get_metrics(model="m1")
    for route in (props, slots, metrics):
        params = route.calls.last.request.url.params
        assert params["model"] == "m1" and params["autoload"] == "false"


@respx.mock
async def test_router_load_and_unload():
    load = respx.post(f"{ROOT}/models/load").respond(200, json={"success": True})
    unload = respx.post(f"{ROOT}/models/unload").respond(
        400, json={"error": {"message": "model is not running"}}
    )
    async with client(api_key=None) as c:
        assert (await c.load_model("m1")) == {"success": True}
        with pytest.raises(ServerHTTPError, match="not running"):
            await c.unload_model("m1")
    assert load.calls.last.request.content == b'{"model":"m1"}'
    assert unload.called


def test_explicit_values_never_read_the_environment(monkeypatch):
    from prefect_llamacpp.config import get_settings

    monkeypatch.setenv("LLAMACPP_BASE_URL", "http://host:abc/v1")  # invalid: must not matter
    monkeypatch.setenv("LLAMACPP_API_KEY", "env-key")
    get_settings.cache_clear()
    explicit = LlamaCppClient("http://gpu-1:8080/v1")
    assert explicit.base_url == "http://gpu-1:8080"
    assert "authorization" not in explicit._http.headers  # no key given: none sent
    with pytest.raises(ValueError, match="port"):
        LlamaCppClient()  # no URL given: the environment is read, and its error says why


@respx.mock
async def test_retry_after_and_transient_statuses():
    from prefect_llamacpp.exceptions import ServerHTTPError

    respx.get(f"{ROOT}/props").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {"message": "x"}}),
            httpx.Response(408, json={"error": {"message": "x"}}),
            httpx.Response(429, headers={"Retry-After": "soon"}, json={"error": {"message": "x"}}),
        ]
    )
    async with client(api_key=None) as c:
        with pytest.raises(ServerHTTPError) as first:
            await c.get_props()
        assert first.value.transient and first.value.retry_after == 7
        with pytest.raises(ServerHTTPError) as second:
            await c.get_props()
        assert second.value.transient and second.value.retry_after is None
        with pytest.raises(ServerHTTPError) as third:
            await c.get_props()
        assert third.value.retry_after is None


@respx.mock
async def test_sent_but_unanswered_is_told_apart_from_never_sent():
    from prefect_llamacpp.exceptions import (
        ServerDisconnectedError,
        ServerTimeoutError,
        ServerUnreachableError,
    )

    route = respx.post(f"{ROOT}/v1/chat/completions")
    async with client(api_key=None) as c:
        route.mock(side_effect=httpx.RemoteProtocolError("Server disconnected"))
        with pytest.raises(ServerDisconnectedError) as dropped:
            await c.chat_completion(b"{}")
        assert isinstance(dropped.value.__cause__, httpx.RemoteProtocolError)  # cause kept
        route.mock(side_effect=httpx.ReadTimeout("slow"))
        with pytest.raises(ServerTimeoutError):
            await c.chat_completion(b"{}")
        route.mock(side_effect=httpx.ConnectError("refused"))
        with pytest.raises(ServerUnreachableError) as refused:
            await c.chat_completion(b"{}")
        assert not isinstance(refused.value, ServerDisconnectedError | ServerTimeoutError)


@respx.mock
async def test_apply_template_posts_the_chat_body_and_returns_the_prompt():
    route = respx.post(f"{ROOT}/apply-template").respond(json={"prompt": "<|im_start|>user\n"})
    async with client() as c:
        assert await c.apply_template(b'{"messages": []}') == "<|im_start|>user\n"
        assert route.calls.last.request.content == b'{"messages": []}'
        route.respond(json={"no": "prompt"})
        with pytest.raises(UnexpectedResponseError, match="without a 'prompt'"):
            await c.apply_template(b"{}")


async def test_a_proxy_from_the_environment_carries_the_hot_path_too(monkeypatch):
    """The client's own transport routes through HTTP_PROXY (and skips NO_PROXY hosts), as
    httpx itself would: a proxy that answers for the server sees both kinds of request."""
    seen: list[str] = []

    async def proxy(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        seen.append(head.split(b" ")[1].decode())
        body = b'{"status": "ok", "choices": [{"message": {"content": "hi"}}]}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with server, LlamaCppClient("http://llama.invalid:8080", api_key=None) as client:
        await client.get_health()
        await client.chat_completion(b'{"messages": []}')
    assert seen == [
        "http://llama.invalid:8080/health",
        "http://llama.invalid:8080/v1/chat/completions",
    ]
    monkeypatch.setenv("NO_PROXY", "llama.invalid")
    async with LlamaCppClient("http://llama.invalid:8080", api_key=None, timeout=2) as client:
        with pytest.raises(ServerUnreachableError):  # straight to the (unresolvable) host
            await client.get_health()


@pytest.mark.parametrize(
    ("env", "url", "proxy"),
    [
        ({"HTTP_PROXY": "p:3128"}, "http://llm.lan:8080", "http://p:3128"),  # no scheme: http
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "llm.lan:8080"}, "http://llm.lan:8080", None),
        (
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "llm.lan:9090"},
            "http://llm.lan:8080",
            "http://p:3128",
        ),
        (
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "http://llm.lan"},
            "http://llm.lan:8080",
            None,
        ),
        (
            {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "https://llm.lan"},
            "http://llm.lan:8080",
            "http://p:3128",
        ),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": ".lan"}, "http://llm.lan:8080", None),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "an"}, "http://llm.lan:8080", "http://p:3128"),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "*"}, "http://llm.lan:8080", None),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "[::1]:8080"}, "http://[::1]:8080", None),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "127.0.0.1"}, "http://127.0.0.1:8080", None),
        ({"HTTPS_PROXY": "http://p:3128"}, "http://llm.lan:8080", None),
        ({"ALL_PROXY": "http://p:1080"}, "http://llm.lan:8080", "http://p:1080"),
    ],
)
def test_the_environments_proxy_is_read_as_httpx_reads_it(monkeypatch, env, url, proxy):
    from prefect_llamacpp.client import _environment_proxy

    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _environment_proxy(url) == proxy
    LlamaCppClient(url, api_key=None)  # builds its transport with it
