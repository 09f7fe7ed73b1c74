"""The runner's bounds, on a scripted server over real sockets (tests/fake_llama.py): faults a
real llama-server does not show on demand. The crash test against a real server is in
tests/flows/test_batch_hardening.py."""

from __future__ import annotations

import json
import time

import pytest

from prefect_llamacpp.batch.jsonl_input import BatchItem
from prefect_llamacpp.batch.runner import BatchOptions, BatchRunner
from prefect_llamacpp.config import LlamaCppSettings
from tests.fake_llama import FakeLlamaServer, completion


def items(*prompts: str) -> list[BatchItem]:
    return [
        BatchItem(f"id-{i}", i + 1, [{"role": "user", "content": prompt}])
        for i, prompt in enumerate(prompts)
    ]


async def run(server: FakeLlamaServer | list, batch: list[BatchItem], **options) -> dict[str, dict]:
    """Run `batch` over one fake server, or over a list of lanes (a fleet)."""
    results = {}
    servers = (
        server if isinstance(server, list) else LlamaCppSettings(base_url=server.url, timeout=5)
    )
    runner = BatchRunner(
        servers,
        "fake",
        BatchOptions.of(**{"concurrency": 4, "ready_timeout": 5, **options}),
        on_results=lambda lines: results.update((line["custom_id"], line) for line in lines),
    )
    try:
        await runner.run(batch)
    finally:
        await runner.aclose()
    return results


def prompt_of(request: dict) -> str:
    return request["messages"][-1]["content"]


async def test_429_and_408_are_waits_and_retry_after_is_honoured():
    seen: dict[str, list[float]] = {}

    def answer(request):
        times = seen.setdefault(prompt_of(request), [])
        times.append(time.monotonic())
        if len(times) == 1:
            status = 429 if prompt_of(request) == "a" else 408
            return status, {"Retry-After": "1"}, {"error": {"message": "slow down"}}
        return completion()

    async with FakeLlamaServer(answer) as server:
        results = await run(server, items("a", "b"))
    assert all(line["error"] is None and line["attempts"] == 2 for line in results.values())
    for times in seen.values():
        assert times[1] - times[0] >= 1.0, "Retry-After: 1 was not honoured"


async def test_attempts_are_bounded_however_the_server_fails():
    async with FakeLlamaServer(lambda request: (503, {}, {"error": {"message": "busy"}})) as server:
        results = await run(server, items("a"), max_attempts=2)
    line = results["id-0"]
    assert line["error"]["kind"] == "server_unavailable"
    assert line["attempts"] <= 2 * (2 + 2)
    assert len(server.requests) == line["attempts"]


async def test_a_prompt_that_crashes_the_server_is_isolated_and_innocents_finish():
    # Fakes a server that dies on one prompt (and is restarted at once by a supervisor): every
    # request in flight with the poison is dropped unanswered.
    def answer(request):
        return "crash" if prompt_of(request) == "POISON" else completion()

    batch = items("one", "two", "POISON", "three", "four", "five")
    async with FakeLlamaServer(answer, delay=0.2) as server:
        results = await run(server, batch, max_crashes=2)
    assert set(results) == {line.custom_id for line in batch}
    assert results["id-2"]["error"]["kind"] == "server_crash"
    innocents = [line for key, line in results.items() if key != "id-2"]
    assert all(line["error"] is None for line in innocents), innocents
    poison_sent = sum(prompt_of(r) == "POISON" for r in server.requests)
    assert poison_sent == 2  # in flight at the first crash, alone at the second
    assert len(server.requests) <= len(batch) * 2 * (3 + 2)


async def test_a_connection_cut_while_the_server_stays_up_is_no_crash():
    # A proxy (or the network) cuts one request twice; the server never goes down. The second
    # cut comes while the request runs alone: it must not be blamed as the crash of a server
    # that did not crash.
    cuts = {"FLAKY": 2}

    def answer(request):
        if cuts.get(prompt_of(request), 0) > 0:
            cuts[prompt_of(request)] -= 1
            return "drop"
        return completion()

    async with FakeLlamaServer(answer) as server:
        results = await run(server, items("one", "FLAKY", "two"), max_crashes=2)
    assert all(line["error"] is None for line in results.values()), results
    assert results["id-1"]["attempts"] == 3
    assert server.crashes == 0


@pytest.mark.parametrize("while_down", ["loading", "drop"])
async def test_a_suspect_is_never_sent_into_a_restart(while_down):
    # The server restarts for 1.5 s after the poison kills it (answering 503 loading, or behind
    # a proxy that drops every connection meanwhile). Five innocents were in flight with the
    # poison at its first crash; each then runs alone, and only when the server is ready again,
    # so none is blamed for the crash the poison caused alone.
    def answer(request):
        return "crash" if prompt_of(request) == "POISON" else completion()

    batch = items("one", "two", "POISON", "three", "four", "five")
    async with FakeLlamaServer(answer, delay=0.2, restart_s=1.5, while_down=while_down) as server:
        results = await run(server, batch, max_crashes=2, ready_timeout=30)
    assert results["id-2"]["error"]["kind"] == "server_crash"
    assert all(line["error"] is None for key, line in results.items() if key != "id-2"), results
    assert server.crashes == 2


async def test_timeouts_are_retried_then_reported():
    async with FakeLlamaServer(lambda request: completion(), delay=1.0) as server:
        results = await run(server, items("slow"), request_timeout=0.3, max_attempts=2)
    assert results["id-0"]["error"]["kind"] == "timeout"
    assert results["id-0"]["attempts"] == 2


async def test_a_status_that_retrying_cannot_fix_is_the_items_own_error():
    def answer(request):
        if prompt_of(request) == "long":
            return 400, {}, {"error": {"message": "the request exceeds the available context size"}}
        return (
            500,
            {},
            {
                "error": {
                    "message": "The model produced output that does not match the expected peg-native format"
                }
            },
        )

    async with FakeLlamaServer(answer) as server:
        results = await run(server, items("long", "schema"))
    assert results["id-0"]["error"]["kind"] == "bad_request"
    assert "context size" in results["id-0"]["error"]["message"]
    assert results["id-1"]["error"]["kind"] == "validation"
    assert "max_tokens" in results["id-1"]["error"]["message"]
    assert len(server.requests) == 2


async def test_running_a_chunk_again_sends_and_writes_nothing_twice(tmp_path):
    # A Prefect-level retry of a chunk (a global default for task retries, say) runs it again.
    from prefect_llamacpp.batch.ledger import Ledger

    async with FakeLlamaServer(lambda request: completion()) as server:
        with Ledger.open(tmp_path / "out.jsonl") as ledger:
            runner = BatchRunner(
                LlamaCppSettings(base_url=server.url, timeout=5),
                "fake",
                BatchOptions.of(concurrency=2),
                on_results=ledger.write_all,
                already_done=ledger.succeeded.__contains__,
            )
            chunk = items("a", "b", "c")
            await runner.run(chunk)
            await runner.run(chunk)
            await runner.aclose()
    assert len(server.requests) == 3
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


async def test_garbage_answers_are_the_items_error_and_the_run_goes_on():
    # Fakes a server (or a proxy) answering what llama-server never sends.
    def answer(request):
        prompt = prompt_of(request)
        if prompt == "overflow":
            return (
                200,
                {},
                {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 1e999}},
            )
        if prompt == "deep":
            return 200, {}, [[[[[[[[[[[]]]]]]]]]]]
        if prompt == "not-a-completion":
            return 200, {}, {"hello": "world"}
        return completion()

    async with FakeLlamaServer(answer) as server:
        results = await run(server, items("a", "overflow", "deep", "not-a-completion", "b"))
    assert [results[f"id-{i}"]["error"] for i in (0, 4)] == [None, None]
    for i in (1, 2, 3):
        assert results[f"id-{i}"]["error"]["kind"] == "invalid_response"


async def test_a_deeply_nested_body_does_not_escape_the_error_mapping():
    import httpx

    from prefect_llamacpp.client import LlamaCppClient

    nested = b"[" * 100_000 + b"]" * 100_000
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=nested))
    async with LlamaCppClient("http://127.0.0.1:1") as client:
        client._transport = transport  # the hot path sends through the client's transport
        from prefect_llamacpp.exceptions import UnexpectedResponseError

        with pytest.raises(UnexpectedResponseError, match="not JSON"):
            await client.chat_completion(b"{}")


async def test_over_a_fleet_free_slots_pull_the_work():
    # Three scripted servers with 1, 2 and 4 slots and the same time per request: throughput in
    # proportion to the slots, which real servers sharing this 2-core machine cannot show.
    from prefect_llamacpp.batch.dispatch import Lane

    servers = [
        # 40 ms a request: the servers, not this process's CPU (shared with them), set the pace.
        FakeLlamaServer(lambda request: completion(), delay=0.04, slots=n)
        for n in (1, 2, 4)
    ]
    for server in servers:
        await server.__aenter__()
    try:
        lanes = [
            Lane(f"s{n}", LlamaCppSettings(base_url=server.url, timeout=5), "fake", n + 1)
            for n, server in zip((1, 2, 4), servers, strict=True)
        ]
        results = {}
        runner = BatchRunner(
            lanes,
            "fake",
            BatchOptions.of(concurrency=10),
            on_results=lambda lines: results.update((line["custom_id"], line) for line in lines),
        )
        await runner.run(items(*[f"p{i}" for i in range(700)]))
        await runner.aclose()
    finally:
        for server in servers:
            await server.__aexit__()
    assert len(results) == 700 and all(line["error"] is None for line in results.values())
    shares = {lane.name: lane.stats.succeeded / 700 for lane in lanes}
    for lane, slots in zip(lanes, (1, 2, 4), strict=True):
        assert abs(shares[lane.name] - slots / 7) <= 0.08, shares  # the issue allows 0.15
    assert {line["server"] for line in results.values()} == {"s1", "s2", "s4"}


async def test_lines_whose_only_server_is_gone_fail_after_the_deadline_the_rest_finish():
    from harness.server import free_port
    from prefect_llamacpp.batch.dispatch import Lane

    async with FakeLlamaServer(lambda request: completion()) as alive:
        gone = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused
        lanes = [
            Lane("a", LlamaCppSettings(base_url=gone, timeout=2), "m1", 2),
            Lane("b", LlamaCppSettings(base_url=alive.url, timeout=2), "m2", 2),
        ]
        batch = [
            BatchItem(f"m1-{i}", i, [{"role": "user", "content": "x"}], model="m1")
            for i in range(3)
        ] + items("p0", "p1", "p2", "p3")
        results = {}
        runner = BatchRunner(
            lanes,
            "fleet",
            BatchOptions.of(concurrency=4, ready_timeout=1),
            on_results=lambda lines: results.update((line["custom_id"], line) for line in lines),
        )
        started = time.monotonic()
        await runner.run(batch)
        await runner.aclose()
    assert time.monotonic() - started < 10, "no hang"
    assert all(results[f"m1-{i}"]["error"]["kind"] == "unreachable" for i in range(3))
    assert "model 'm1'" in results["m1-0"]["error"]["message"]
    assert all(results[f"id-{i}"]["error"] is None for i in range(4))
    assert lanes[0].stats.taken_out == 1


# -- reasoning models ------------------------------------------------------------------------------


async def test_reasoning_goes_apart_and_structured_output_is_read_from_the_answer_only():
    import httpx
    import respx

    body = {
        "model": "qwen3",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    # JSON-looking thoughts that do not fit the schema: parsing them would fail.
                    "reasoning_content": 'Maybe {"stars": "many"}? No: {"stars": 4}.',
                    "content": '{"stars": 4}',
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 30},
    }
    schema = {"type": "object", "properties": {"stars": {"type": "integer"}}, "required": ["stars"]}
    results = []
    with respx.mock:
        route = respx.post("http://llama.test/v1/chat/completions").mock(
            return_value=httpx.Response(200, json=body)
        )
        runner = BatchRunner(
            LlamaCppSettings(base_url="http://llama.test"),
            "qwen3",
            BatchOptions.of(
                concurrency=1,
                output_schema=schema,
                chat_template_kwargs={"enable_thinking": True},
            ),
            on_results=results.extend,
        )
        await runner.run(items("rate it"))
        await runner.aclose()
        sent = json.loads(route.calls[0].request.content)

    (result,) = results
    assert result["output"] == {"stars": 4} and result["error"] is None
    assert result["reasoning"] == body["choices"][0]["message"]["reasoning_content"]
    assert result["response"] == {"status_code": 200, "body": body}
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}


@pytest.mark.parametrize("restart_s", [0.0, 1.0])
async def test_behind_a_proxy_that_answers_502_for_a_crash_the_poison_is_isolated(restart_s):
    # nginx answers 502 ("upstream prematurely closed") to the requests in flight when the
    # server dies, and to everything while it restarts. With restart_s=0 the server is back
    # before anyone can check: the poison still ends as server_crash, the innocents answered.
    def answer(request):
        return "crash" if prompt_of(request) == "POISON" else completion()

    batch = items("one", "two", "POISON", "three", "four", "five")
    async with FakeLlamaServer(answer, delay=0.2, restart_s=restart_s, while_down="502") as server:
        results = await run(server, batch, max_crashes=2, ready_timeout=30)
    assert results["id-2"]["error"]["kind"] == "server_crash", results["id-2"]
    assert all(line["error"] is None for key, line in results.items() if key != "id-2"), results
    assert server.crashes <= 2 * (3 + 2)
    assert sum(prompt_of(r) == "POISON" for r in server.requests) <= 2 * (3 + 2)


async def test_a_restart_too_fast_to_see_still_gives_the_poison_up_as_server_crash():
    def answer(request):
        return "crash" if prompt_of(request) == "POISON" else completion()

    batch = items("one", "POISON", "two", "three")
    async with FakeLlamaServer(answer, delay=0.2, restart_s=0.0) as server:
        results = await run(server, batch, max_crashes=2)
    assert results["id-1"]["error"]["kind"] == "server_crash"
    assert "answered /health right after" in results["id-1"]["error"]["message"]
    assert all(line["error"] is None for key, line in results.items() if key != "id-1")
    assert server.crashes <= 2 * 2


# -- servers not ready when the run starts -------------------------------------------------------

MODELS_B = {
    "/props": (200, {}, {"total_slots": 2}),
    "/v1/models": (200, {}, {"object": "list", "data": [{"id": "b"}]}),
}
UNAUTHORIZED = (401, {}, {"error": {"message": "Invalid API Key", "code": 401}})


def lane(server: FakeLlamaServer, name: str, model: str | None = None):
    """A fleet lane for `server`: ready, serving `model` on 2 slots, or (no model) pending."""
    from prefect_llamacpp.batch.dispatch import Lane
    from prefect_llamacpp.status import ProviderHealthStatus, ServerState

    status = None
    if model is not None:
        status = ProviderHealthStatus(
            connected=True,
            model_detected=True,
            model_id=model,
            base_url=server.url,
            state=ServerState.READY,
            total_slots=2,
            models=[model],
        )
    return Lane.for_server(
        name,
        LlamaCppSettings(base_url=server.url, timeout=5),
        status,
        concurrency=None,
        queue_depth=1,
        request_timeout=5,
    )


def naming(model: str | None, *prompts: str) -> list[BatchItem]:
    return [
        BatchItem(f"{model}-{i}", i + 1, [{"role": "user", "content": prompt}], model=model)
        for i, prompt in enumerate(prompts)
    ]


async def test_lines_naming_a_late_servers_model_wait_for_it_and_others_fail_when_it_joins():
    async with (
        FakeLlamaServer(lambda request: completion()) as a,
        FakeLlamaServer(lambda request: completion(), routes=MODELS_B) as b,
    ):
        b.down_for(1.0)  # loading when the run starts
        lanes = [lane(a, "A", "a"), lane(b, "B")]
        batch = naming("b", "x", "y") + naming("a", "z") + naming("c", "w")
        results = await run(lanes, batch, ready_timeout=10)
    assert [results[f"b-{i}"]["server"] for i in range(2)] == ["B", "B"]
    assert results["a-0"]["server"] == "A" and results["a-0"]["error"] is None
    missing = results["c-0"]["error"]
    assert missing["kind"] == "no_server_for_model" and "'c'" in missing["message"], missing
    assert "a, b" in missing["message"] and "llamacpp" not in missing["message"]


async def test_a_late_server_that_refuses_the_key_never_joins():
    routes = {"/props": UNAUTHORIZED, "/v1/models": UNAUTHORIZED}
    async with (
        FakeLlamaServer(lambda request: completion()) as a,
        FakeLlamaServer(lambda request: completion(), routes=routes) as c,
    ):
        c.down_for(0.5)
        lanes = [lane(a, "A", "a"), lane(c, "C")]
        batch = naming(None, *[f"q{i}" for i in range(4)]) + naming("c", "only-c")
        results = await run(lanes, batch, ready_timeout=10)
        assert lanes[1].retired and not lanes[1].up
    assert all(results[f"None-{i}"]["server"] == "A" for i in range(4))
    assert results["c-0"]["error"]["kind"] == "no_server_for_model"
    assert c.requests == [], "nothing was sent to a server that refuses the key"


async def test_a_late_server_that_is_not_a_llama_server_is_watched_without_a_busy_loop():
    routes = {"/health": (404, {}, {"detail": "Not Found"})}
    async with (
        FakeLlamaServer(lambda request: completion(), delay=0.5, slots=1) as a,
        FakeLlamaServer(lambda request: completion(), routes=routes) as other,
    ):
        lanes = [lane(a, "A", "a"), lane(other, "elsewhere")]
        started = time.monotonic()
        results = await run(
            lanes, ready_timeout=10, batch=naming(None, *[f"q{i}" for i in range(6)])
        )
        elapsed = time.monotonic() - started
    assert all(line["error"] is None for line in results.values())
    assert elapsed > 1.5
    assert len(other.gets) <= 2 + elapsed, other.gets  # about one look per 2 s, not thousands
