"""The provider library against a real llama-server: ready, key, slots, metrics, router."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from prefect_llamacpp import ServerState, detect_llamacpp_model, llamacpp_health_check
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.exceptions import ModelError, NotSupportedError, UnauthorizedError
from tests.conftest import SECRET_KEY
from tests.servers import settings_for

pytestmark = pytest.mark.integration


async def test_ready_server_reports_model_slots_and_build(server):
    status = await llamacpp_health_check(settings_for(server))
    assert status.state == ServerState.READY
    assert status.connected and status.model_detected
    assert status.model_id == "tiny"
    assert status.server_status == "ok"
    assert status.total_slots == 4
    assert status.n_ctx == 1024  # -c 4096 shared by -np 4
    assert status.build_info.startswith("b")
    assert status.is_sleeping is False


async def test_client_endpoints(server):
    async with LlamaCppClient(server.url, api_key=None) as client:
        props = await client.get_props()
        slots = await client.get_slots()
        models = await client.list_models()
        assert len(slots) == props["total_slots"] == 4
        assert {slot["id"] for slot in slots} == {0, 1, 2, 3}
        assert models[0]["id"] == "tiny"
        assert models[0]["meta"]["n_vocab"] > 256
        assert await client.is_running()
        assert await client.is_model_loaded()
        assert await client.is_model_loaded("tiny")
        assert not await client.is_model_loaded("not-served")
        assert await client.wait_until_ready(timeout=5) == {"status": "ok"}


async def test_detect_model(server):
    assert await detect_llamacpp_model(server.openai_base) == "tiny"
    assert await detect_llamacpp_model(server.url + "/") == "tiny"


async def test_metrics_counters_grow_after_a_completion(server):
    async with LlamaCppClient(server.url, api_key=None) as client:
        before = await client.get_metrics()
        for name in ("requests_processing", "requests_deferred", "prompt_tokens_total"):
            assert name in before
        response = await client._http.post(
            f"{server.openai_base}/chat/completions",
            # ignore_eos: the random-weight model may end an answer before 8 tokens
            json={
                "messages": [{"role": "user", "content": "count"}],
                "max_tokens": 8,
                "ignore_eos": True,
            },
            timeout=30,
        )
        assert response.status_code == 200
        after = await client.get_metrics()
    assert after["tokens_predicted_total"] >= before["tokens_predicted_total"] + 8
    assert after["prompt_tokens_total"] > before["prompt_tokens_total"]


async def test_metrics_disabled_says_so(key_server):
    async with LlamaCppClient(key_server.url, api_key=SECRET_KEY) as client:
        with pytest.raises(NotSupportedError, match="--metrics") as info:
            await client.get_metrics()
    assert info.value.status_code == 501


async def test_slots_disabled_is_not_down(no_slots_server):
    async with LlamaCppClient(no_slots_server.url, api_key=None) as client:
        with pytest.raises(NotSupportedError, match="slots are disabled") as info:
            await client.get_slots()
    assert info.value.status_code == 501
    status = await llamacpp_health_check(settings_for(no_slots_server))
    assert status.state == ServerState.READY


@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_wrong_or_missing_key_is_unauthorized(key_server, key, caplog):
    caplog.set_level(logging.DEBUG)
    status = await llamacpp_health_check(settings_for(key_server, api_key=key))
    assert status.state == ServerState.UNAUTHORIZED
    assert status.connected
    assert "LLAMACPP_API_KEY" in status.error
    with pytest.raises(ModelError) as info:
        await detect_llamacpp_model(key_server.openai_base, api_key=key or "")
    assert info.value.details["status_code"] == 401
    captured = status.model_dump_json() + caplog.text + str(info.value) + repr(info.value.details)
    assert SECRET_KEY not in captured


async def test_right_key_is_ready_and_never_shown(key_server, caplog):
    caplog.set_level(logging.DEBUG)
    status = await llamacpp_health_check(settings_for(key_server, api_key=SECRET_KEY))
    assert status.state == ServerState.READY
    assert status.model_id == "tiny-secure"
    async with LlamaCppClient(key_server.url, api_key=SECRET_KEY) as client:
        assert len(await client.get_slots()) == 2
        text = repr(client)
    assert SECRET_KEY not in status.model_dump_json() + caplog.text + text


def test_health_stays_public_with_a_key(key_server):
    assert httpx.get(f"{key_server.url}/health").status_code == 200
    assert httpx.get(f"{key_server.url}/props").status_code == 401


async def test_unauthorized_client_error(key_server):
    async with LlamaCppClient(key_server.url, api_key="nope") as client:
        with pytest.raises(UnauthorizedError, match="rejected the API key"):
            await client.get_props()


async def test_router_mode_list_load_unload_without_autoload(router_server):
    async with LlamaCppClient(router_server.url, api_key=None) as client:
        props = await client.get_props()
        assert props["role"] == "router"
        statuses = {m["id"]: m["status"]["value"] for m in await client.list_models()}
        assert statuses == {"alpha": "unloaded", "beta": "unloaded"}

        # Looking at a model must not load it.
        with pytest.raises(Exception, match="not loaded"):
            await client.get_props(model="alpha")
        assert not await client.is_model_loaded("alpha")
        status = await llamacpp_health_check(settings_for(router_server))
        assert status.state == ServerState.READY and not status.model_detected
        assert status.router_models == {"alpha": "unloaded", "beta": "unloaded"}

        assert (await client.load_model("alpha"))["success"] is True
        loaded = await _wait_for_router_status(client, "alpha", "loaded")
        assert loaded == "loaded"
        assert (await client.get_props(model="alpha"))["total_slots"] >= 1
        status = await llamacpp_health_check(settings_for(router_server))
        assert status.model_id == "alpha"

        assert (await client.unload_model("alpha"))["success"] is True
        assert await _wait_for_router_status(client, "alpha", "unloaded") == "unloaded"


async def _wait_for_router_status(client, model, wanted, timeout=30.0):
    import asyncio
    import time

    from prefect_llamacpp.client import router_model_status

    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        entries = {m["id"]: m for m in await client.list_models()}
        value = router_model_status(entries[model])
        if value == wanted:
            return value
        await asyncio.sleep(0.1)
    return value


async def test_key_also_accepted_as_x_api_key_header(key_server):
    # Facts the client relies on, from llama.cpp's own server tests: both headers work.
    async with httpx.AsyncClient() as http:
        bearer = await http.get(
            f"{key_server.url}/v1/models", headers={"Authorization": f"Bearer {SECRET_KEY}"}
        )
        x_api_key = await http.get(f"{key_server.url}/v1/models", headers={"X-Api-Key": SECRET_KEY})
        wrong = await http.get(f"{key_server.url}/v1/models", headers={"X-Api-Key": "nope"})
    assert bearer.status_code == x_api_key.status_code == 200
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"


async def test_v1_health_and_fail_on_no_slot(server):
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{server.url}/v1/health")).json() == {"status": "ok"}
        idle = await http.get(f"{server.url}/slots", params={"fail_on_no_slot": 1})
        assert idle.status_code == 200
        # Fill every slot with long generations, then ask again: 503 "no slot available".
        body = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 600,
            "ignore_eos": True,
        }
        busy = [
            asyncio.create_task(http.post(f"{server.openai_base}/chat/completions", json=body))
            for _ in range(4)
        ]
        full = None
        deadline = time.monotonic() + 30  # the four may start far apart on a loaded machine
        while time.monotonic() < deadline and not all(task.done() for task in busy):
            slots = (await http.get(f"{server.url}/slots")).json()
            if all(slot["is_processing"] for slot in slots):
                full = await http.get(f"{server.url}/slots", params={"fail_on_no_slot": 1})
                break
            await asyncio.sleep(0.005)
        await asyncio.gather(*busy)
    assert full is not None, "the slots never all became busy"
    assert full.status_code == 503
    assert "no slot available" in full.json()["error"]["message"]
