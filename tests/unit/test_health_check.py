"""Every state of design.md's health table, from mocked llama-server answers."""

from __future__ import annotations

import httpx
import pytest
import respx

from prefect_llamacpp import ServerState, llamacpp_health_check
from prefect_llamacpp.config import LlamaCppSettings
from tests.unit.fakes import LOADING, MODELS, PROPS, ROOT, UNAUTHORIZED, ready_server


def settings(**overrides) -> LlamaCppSettings:
    return LlamaCppSettings(base_url=f"{ROOT}/v1", timeout=2, **overrides)


@respx.mock
async def test_ready_reports_model_and_props():
    ready_server(respx)
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.READY
    assert status.connected and status.model_detected
    assert status.model_id == "qwen3-0.6b-q8_0.gguf"
    assert status.base_url == f"{ROOT}/v1"
    assert status.provider_type == "llamacpp"
    assert status.error is None
    assert status.server_status == "ok"
    assert status.total_slots == 4
    assert status.n_ctx == 4096
    assert status.build_info == "b1-0c1e570"
    assert status.is_sleeping is False


@respx.mock
async def test_health_check_never_calls_slots():
    ready_server(respx)
    slots = respx.get(f"{ROOT}/slots").respond(200, json=[])
    await llamacpp_health_check(settings())
    assert not slots.called


@respx.mock
async def test_loading():
    respx.get(f"{ROOT}/health").mock(return_value=LOADING)
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.LOADING
    assert status.connected and not status.model_detected
    assert "loading the model" in status.error


@respx.mock
async def test_sleeping_is_reported_from_props_without_waking():
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(
        200, json={**PROPS, "is_sleeping": True, "model_alias": "qwen3"}
    )
    models = respx.get(f"{ROOT}/v1/models").respond(200, json={"data": []})
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.SLEEPING
    assert status.model_id == "qwen3"
    assert status.is_ready
    assert not models.called


@pytest.mark.parametrize("with_key", [True, False])
@respx.mock
async def test_unauthorized_says_to_set_the_key(with_key):
    key = "sk-wrong-key-123"
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").mock(return_value=UNAUTHORIZED)
    status = await llamacpp_health_check(settings(api_key=key if with_key else None))
    assert status.state == ServerState.UNAUTHORIZED
    assert status.connected
    assert "LLAMACPP_API_KEY" in status.error
    assert ("rejected" in status.error) is with_key
    assert key not in status.model_dump_json()


@respx.mock
async def test_health_401_from_api_prefix_bug_still_ready_with_key():
    respx.get(f"{ROOT}/health").mock(return_value=UNAUTHORIZED)
    respx.get(f"{ROOT}/props").respond(200, json=PROPS)
    respx.get(f"{ROOT}/v1/models").respond(200, json={"data": [{"id": "m"}]})
    status = await llamacpp_health_check(settings(api_key="k"))
    assert status.state == ServerState.READY
    assert status.model_id == "m"


@respx.mock
async def test_unreachable():
    respx.get(f"{ROOT}/health").mock(side_effect=httpx.ConnectError("refused"))
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.UNREACHABLE
    assert not status.connected
    assert "cannot reach" in status.error


@respx.mock
async def test_health_accepted_but_never_answered_is_wedged():
    respx.get(f"{ROOT}/health").mock(side_effect=httpx.ReadTimeout("slow"))
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.WEDGED and status.connected
    assert "did not answer" in status.error and "stopped or stuck" in status.error


@respx.mock
async def test_no_connection_in_time_is_unreachable():
    respx.get(f"{ROOT}/health").mock(side_effect=httpx.ConnectTimeout("no route"))
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.UNREACHABLE and not status.connected


@respx.mock
async def test_html_page_is_error_naming_url_and_status():
    respx.get(f"{ROOT}/health").respond(
        200, text="<html>Welcome to nginx</html>", headers={"content-type": "text/html"}
    )
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.ERROR
    assert status.connected
    assert f"{ROOT}/health" in status.error and "200" in status.error


@respx.mock
async def test_proxy_502_html_is_error():
    respx.get(f"{ROOT}/health").respond(
        502, text="<html>Bad Gateway</html>", headers={"content-type": "text/html"}
    )
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.ERROR
    assert "502" in status.error
    assert status.http_status == 502


@respx.mock
async def test_server_500_is_error():
    respx.get(f"{ROOT}/health").respond(
        500, json={"error": {"message": "boom", "type": "server_error", "code": 500}}
    )
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.ERROR
    assert "boom" in status.error


@respx.mock
async def test_no_model_listed_is_error():
    ready_server(respx, models={"object": "list", "data": []})
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.ERROR
    assert not status.model_detected
    assert "lists no model" in status.error


@respx.mock
async def test_props_missing_behind_proxy_is_not_fatal():
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(404, json={"error": {"message": "File Not Found"}})
    respx.get(f"{ROOT}/v1/models").respond(200, json={"data": [{"id": "m"}]})
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.READY
    assert "404" in status.props_error


@respx.mock
async def test_router_mode_reports_loaded_model():
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(200, json={"role": "router", "model_path": "none"})
    respx.get(f"{ROOT}/v1/models").respond(
        200,
        json={
            "data": [
                {"id": "a", "status": {"value": "unloaded"}},
                {"id": "b", "status": {"value": "loaded"}},
            ]
        },
    )
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.READY
    assert status.model_id == "b"
    assert status.router_models == {"a": "unloaded", "b": "loaded"}


async def test_invalid_url_is_reported_not_raised():
    s = LlamaCppSettings.model_construct(
        base_url="nonsense", timeout=1, api_key=None, model_name=None
    )
    status = await llamacpp_health_check(s)
    assert status.state == ServerState.ERROR
    assert not status.connected
    assert "http://localhost:8080" in status.error


@respx.mock
async def test_odd_props_values_never_fail_the_check_and_are_kept_as_they_came():
    """A proxy or an older server may send /props fields of other types: the typed fields
    take what fits, `metadata` keeps the rest, and the state is still the server's."""
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(
        200,
        json={
            "total_slots": "lots",
            "build_info": 7,
            "default_generation_settings": {"n_ctx": 2048},
        },
    )
    respx.get(f"{ROOT}/v1/models").respond(200, json={"data": [{"id": "m", "aliases": [None, 3]}]})
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.READY and status.model_id == "m"
    assert status.total_slots is None and status.metadata["total_slots"] == "lots"
    assert status.n_ctx == 2048
    assert status.build_info is None and status.metadata["build_info"] == 7


ROUTER = {**PROPS, "role": "router"}


@pytest.mark.parametrize(
    ("props", "models", "state", "model_id", "served"),
    [
        # /props that is not an object: noted, the check goes on from /v1/models
        ([1, 2], None, "ready", "qwen3-0.6b-q8_0.gguf", ["qwen3-0.6b-q8_0.gguf"]),
        ("hi", None, "ready", "qwen3-0.6b-q8_0.gguf", ["qwen3-0.6b-q8_0.gguf"]),
        # entries llama-server would not send are passed over, the others kept
        (None, {"data": [None, "qwen", 5, [1], {"id": 5}, {"id": "m"}]}, "ready", "m", ["m"]),
        (None, {"data": [{"id": "m", "aliases": 5}]}, "ready", "m", ["m"]),
        (None, {"data": [{"id": "m", "aliases": ["qwen", 7, None]}]}, "ready", "m", ["m", "qwen"]),
        (None, {"data": [{"id": 5}]}, "error", None, []),
        # a router entry without an id does not hide the loaded model
        (
            ROUTER,
            {"data": [{"status": {"value": "loaded"}}, {"id": "m", "status": {"value": "loaded"}}]},
            "ready",
            "m",
            ["m"],
        ),
        (ROUTER, {"data": [{"id": ["a"], "status": "loaded"}]}, "ready", None, []),
        # asleep, named by odd values: the file name, else no name
        (
            {**PROPS, "is_sleeping": True, "model_alias": 5},
            None,
            "sleeping",
            "qwen3-0.6b-q8_0.gguf",
            [],
        ),
        ({**PROPS, "is_sleeping": True, "model_path": ["x"]}, None, "sleeping", None, []),
    ],
)
@respx.mock
async def test_answers_llama_server_would_not_send_never_raise(
    props, models, state, model_id, served
):
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(200, json=PROPS if props is None else props)
    respx.get(f"{ROOT}/v1/models").respond(200, json=models or MODELS)
    status = await llamacpp_health_check(settings())
    assert (status.state, status.model_id) == (state, model_id), status.error
    assert [*status.models, *status.model_aliases] == served


@respx.mock
async def test_a_canary_answer_of_another_shape_is_an_error_state():
    ready_server(respx)
    respx.post(f"{ROOT}/v1/chat/completions").respond(
        200,
        content=b'data: {"choices": 5}\n\ndata: [DONE]\n\n',
        headers={"content-type": "text/event-stream"},
    )
    status = await llamacpp_health_check(settings(), canary=True)
    assert status.state == ServerState.ERROR and "not what llama-server sends" in status.error


def test_a_key_that_is_not_ascii_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="not ASCII"):
        settings(api_key="sk-é")
