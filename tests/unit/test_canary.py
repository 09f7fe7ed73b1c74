"""The canary's rules, from mocked llama-server answers: when it is sent, and busy vs wedged.

The same rules run against real servers (and a stalling proxy) in tests/integration.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import respx

from prefect_llamacpp import ServerState, llamacpp_health_check
from prefect_llamacpp.canary import CanaryOptions, observe_progress
from prefect_llamacpp.client import LlamaCppClient
from prefect_llamacpp.config import LlamaCppSettings
from prefect_llamacpp.status import CanaryLatency
from tests.unit.fakes import PROPS, ROOT, ready_server

FAST = CanaryOptions(first_byte_timeout=0.2, total_timeout=0.4, progress_interval=0.05)
# Where the mock answers at once: deadlines no pause of a loaded machine (a full collection
# took 0.4 s) can miss.
AT_EASE = CanaryOptions(first_byte_timeout=10, total_timeout=20, progress_interval=0.05)
COMPLETIONS = f"{ROOT}/v1/chat/completions"


def settings() -> LlamaCppSettings:
    return LlamaCppSettings(base_url=f"{ROOT}/v1", timeout=2)


def sse(*chunks: dict) -> httpx.Response:
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
    return httpx.Response(200, text="".join(lines), headers={"content-type": "text/event-stream"})


ONE_TOKEN = sse(
    {"choices": [{"delta": {"role": "assistant", "content": "O"}, "finish_reason": None}]},
    {"choices": [{"delta": {}, "finish_reason": "length"}]},
)


def metrics_text(n_decode: float, processing: float, predicted: float = 0) -> str:
    return (
        f"llamacpp:n_decode_total {n_decode}\n"
        f"llamacpp:requests_processing {processing}\n"
        "llamacpp:requests_deferred 0\n"
        "llamacpp:prompt_tokens_total 120\n"
        "llamacpp:prompt_seconds_total 0.5\n"
        f"llamacpp:tokens_predicted_total {predicted}\n"
        "llamacpp:tokens_predicted_seconds_total 2\n"
    )


def metrics_server(router, *readings: str):
    ready_server(router, props={**PROPS, "endpoint_metrics": True})
    return router.get(f"{ROOT}/metrics").mock(
        side_effect=[httpx.Response(200, text=text) for text in readings]
    )


async def stall(request):
    await asyncio.sleep(30)


@respx.mock
async def test_no_canary_unless_asked():
    ready_server(respx)
    completions = respx.post(COMPLETIONS).mock(return_value=ONE_TOKEN)
    status = await llamacpp_health_check(settings())
    assert status.state == ServerState.READY
    assert not completions.called
    assert status.latency is None and status.canary is None


@respx.mock
async def test_ready_with_latency_and_throughput():
    metrics_server(respx, metrics_text(10, 0, predicted=100))
    completions = respx.post(COMPLETIONS).mock(return_value=ONE_TOKEN)
    status = await llamacpp_health_check(settings(), canary=AT_EASE)
    assert status.state == ServerState.READY
    body = json.loads(completions.calls.last.request.content)
    assert body["max_tokens"] == 1 and body["stream"] is True
    latency = status.latency
    assert 0 <= latency.ttfb_s <= latency.total_s < 1
    assert latency.prompt_tokens_per_s == 240.0  # 120 tokens / 0.5 s
    assert latency.predicted_tokens_per_s == 50.0  # 100 tokens / 2 s
    assert status.canary == "answered"


@respx.mock
async def test_sleeping_server_gets_no_canary():
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(200, json={**PROPS, "is_sleeping": True})
    completions = respx.post(COMPLETIONS).mock(return_value=ONE_TOKEN)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.SLEEPING
    assert not completions.called
    assert status.latency == CanaryLatency()  # all None
    assert status.canary.startswith("not sent: the server is asleep")


@respx.mock
async def test_router_without_a_loaded_model_gets_no_canary():
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(200, json={"role": "router", "model_path": "none"})
    respx.get(f"{ROOT}/v1/models").respond(
        200, json={"data": [{"id": "alpha", "status": {"value": "unloaded"}}]}
    )
    completions = respx.post(COMPLETIONS).mock(return_value=ONE_TOKEN)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.READY and status.model_id is None
    assert not completions.called
    assert "no model is loaded" in status.canary


@respx.mock
async def test_router_canary_names_the_loaded_model_and_never_autoloads():
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(200, json={"role": "router", "model_path": "none"})
    respx.get(f"{ROOT}/v1/models").respond(
        200,
        json={
            "data": [
                {"id": "alpha", "status": {"value": "unloaded"}},
                {"id": "beta", "status": {"value": "loaded"}},
            ]
        },
    )
    metrics = respx.get(f"{ROOT}/metrics").respond(200, text=metrics_text(1, 0))
    completions = respx.post(COMPLETIONS).mock(return_value=ONE_TOKEN)
    status = await llamacpp_health_check(settings(), canary=AT_EASE)
    assert status.state == ServerState.READY and status.model_id == "beta"
    request = completions.calls.last.request
    assert json.loads(request.content)["model"] == "beta"
    assert request.url.params["autoload"] == "false"
    assert metrics.calls.last.request.url.params["autoload"] == "false"


@respx.mock
async def test_router_model_unloaded_meanwhile_is_not_a_fault():
    respx.get(f"{ROOT}/health").respond(200, json={"status": "ok"})
    respx.get(f"{ROOT}/props").respond(200, json={"role": "router", "model_path": "none"})
    respx.get(f"{ROOT}/v1/models").respond(
        200, json={"data": [{"id": "beta", "status": {"value": "loaded"}}]}
    )
    respx.post(COMPLETIONS).respond(
        400, json={"error": {"message": "model is not loaded", "type": "invalid_request_error"}}
    )
    status = await llamacpp_health_check(settings(), canary=AT_EASE)
    assert status.state == ServerState.READY
    assert "unloaded meanwhile" in status.canary


@respx.mock
async def test_deadline_missed_while_decoding_is_busy():
    metrics_server(respx, metrics_text(100, 1), metrics_text(180, 1))
    respx.post(COMPLETIONS).mock(side_effect=stall)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.BUSY, status.error
    assert status.is_ready
    assert "first token" in status.error and "n_decode_total +80" in status.error
    assert status.deadline_missed == "first_byte"


@respx.mock
async def test_deadline_missed_with_nothing_moving_is_wedged():
    metrics_server(respx, metrics_text(100, 1), metrics_text(100, 1))
    respx.post(COMPLETIONS).mock(side_effect=stall)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED
    assert not status.is_ready
    assert "nothing progresses" in status.error


@respx.mock
async def test_decodes_without_a_request_processing_are_not_progress():
    # The progress rule needs both: n_decode_total moving and requests_processing > 0.
    metrics_server(respx, metrics_text(100, 0), metrics_text(150, 0))
    respx.post(COMPLETIONS).mock(side_effect=stall)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED


@respx.mock
async def test_headers_without_a_first_event_miss_the_first_byte_deadline():
    # llama-server sends its headers before the model has read the prompt: they do not count.
    async def headers_only():
        await asyncio.sleep(30)
        yield b""

    metrics_server(respx, metrics_text(5, 0), metrics_text(5, 0))
    respx.post(COMPLETIONS).respond(200, stream=headers_only())
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED
    assert status.deadline_missed == "first_byte"


@respx.mock
async def test_only_canary_tokens_give_no_tokens_per_second():
    metrics_server(
        respx,
        "llamacpp:tokens_predicted_total 12\nllamacpp:tokens_predicted_seconds_total 0.000002\n"
        "llamacpp:prompt_tokens_total 300\nllamacpp:prompt_seconds_total 0.003\n",
    )
    respx.post(COMPLETIONS).mock(return_value=ONE_TOKEN)
    status = await llamacpp_health_check(settings(), canary=AT_EASE)
    assert status.state == ServerState.READY
    assert status.latency.predicted_tokens_per_s is None
    assert status.latency.prompt_tokens_per_s == 100000.0  # prompts take time


@respx.mock
async def test_total_deadline_after_a_first_token():
    async def first_token_then_stall():
        yield b'data: {"choices": [{"delta": {"content": "O"}}]}\n\n'
        await asyncio.sleep(30)

    metrics_server(respx, metrics_text(5, 0), metrics_text(5, 0))
    respx.post(COMPLETIONS).respond(200, stream=first_token_then_stall())
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED
    assert status.deadline_missed == "total"
    assert "did not finish its answer to a one-token request within 0.4 s" in status.error


@respx.mock
async def test_server_error_without_progress_is_wedged_with_progress_is_error():
    compute_error = {"error": {"message": "Compute error", "type": "server_error", "code": 500}}
    metrics_server(respx, *[metrics_text(7, 0)] * 2, metrics_text(7, 1), metrics_text(9, 1))
    respx.post(COMPLETIONS).respond(500, json=compute_error)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED
    assert "Compute error" in status.error
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.ERROR
    assert "completions fail while other work progresses" in status.error


@respx.mock
async def test_error_in_the_middle_of_the_stream_is_a_failure():
    metrics_server(respx, metrics_text(7, 0), metrics_text(7, 0))
    respx.post(COMPLETIONS).mock(
        return_value=sse({"error": {"message": "Compute error", "code": 500}})
    )
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED
    assert "in the middle of its answer: Compute error" in status.error


@respx.mock
async def test_a_refused_canary_is_an_error_not_wedged():
    ready_server(respx)
    respx.post(COMPLETIONS).respond(
        400, json={"error": {"message": "bad request", "type": "invalid_request_error"}}
    )
    status = await llamacpp_health_check(settings(), canary=AT_EASE)
    assert status.state == ServerState.ERROR
    assert "refused" in status.error


@respx.mock
async def test_server_gone_during_the_canary_is_unreachable():
    ready_server(respx)
    respx.get(f"{ROOT}/health").mock(
        side_effect=[httpx.Response(200, json={"status": "ok"}), httpx.ConnectError("refused")]
    )
    respx.post(COMPLETIONS).mock(side_effect=httpx.RemoteProtocolError("peer closed"))
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.UNREACHABLE
    assert not status.connected


@respx.mock
async def test_live_server_that_drops_the_canary_is_wedged():
    ready_server(respx)  # /health keeps answering 200
    respx.get(f"{ROOT}/slots").respond(200, json=[{"id": 0, "is_processing": False}])
    respx.post(COMPLETIONS).mock(side_effect=httpx.RemoteProtocolError("peer closed"))
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED
    assert "RemoteProtocolError" in status.error


@respx.mock
async def test_without_metrics_slots_tell_busy():
    ready_server(respx)  # endpoint_metrics False

    def slots(n_decoded: int) -> httpx.Response:
        return httpx.Response(
            200,
            json=[
                {
                    "id": 0,
                    "is_processing": True,
                    "id_task": 3,
                    "n_prompt_tokens_processed": 12,
                    "next_token": [{"n_decoded": n_decoded}],
                }
            ],
        )

    respx.get(f"{ROOT}/slots").mock(side_effect=[slots(10), slots(40)])
    respx.post(COMPLETIONS).mock(side_effect=stall)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.BUSY
    assert "progress fields moved" in status.error


@respx.mock
async def test_slots_that_never_answer_mean_no_progress():
    async with LlamaCppClient(ROOT, api_key=None) as client:
        respx.get(f"{ROOT}/slots").mock(side_effect=stall)
        progress = await observe_progress(
            client, model=None, metrics=False, slots=True, interval=0.05
        )
    assert progress.seen is False
    assert "did not answer" in progress.evidence


@respx.mock
async def test_metrics_that_never_answer_mean_no_progress():
    # /metrics is answered by the task loop too: a stuck loop leaves it hanging.
    ready_server(respx, props={**PROPS, "endpoint_metrics": True})
    respx.get(f"{ROOT}/metrics").mock(side_effect=stall)
    respx.post(COMPLETIONS).mock(side_effect=stall)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED
    assert "/metrics did not answer within 2 s" in status.error


@respx.mock
async def test_no_metrics_and_no_slots_says_how_to_see_progress():
    ready_server(respx, props={**PROPS, "endpoint_slots": False})
    respx.post(COMPLETIONS).mock(side_effect=stall)
    status = await llamacpp_health_check(settings(), canary=FAST)
    assert status.state == ServerState.WEDGED
    assert "--metrics" in status.error


@pytest.mark.parametrize("bad", [{"first_byte_timeout": 0}, {"total_timeout": -1}])
def test_options_reject_non_positive_deadlines(bad):
    with pytest.raises(ValueError):
        CanaryOptions(**bad)
